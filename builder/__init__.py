"""strata: bake appliance images that boot into a self-hosted Kubernetes stack."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS_DIR = ROOT / "layers"
TEMPLATES_DIR = ROOT / "templates"
DEFAULT_DEFINITION = ROOT / "definitions" / "default.yaml"
