"""Where the project's shipped files live (an editable install keeps them beside the code)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS_DIR = REPO_ROOT / "prompts"
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models"

# A run's scratch directory (set by `prefloop run`'s supervisor, which removes it when the
# run ends, however it ends): engines put the temporary files they leave behind there.
SCRATCH_ENV = "PREFLOOP_SCRATCH"
