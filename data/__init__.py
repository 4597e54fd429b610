"""Data for nanocascade: the tokenizer, the chat template (data.chat; data.hf for Hugging Face), the
nine synthetic domains, JSONL loading with clear errors, `check_run`, which checks a run's data before
it starts (data/check.py), and `build`, which writes a dataset directory (data/build.py)."""

import warnings

# `python -m data.build` imports this package (and so data.build) before running data/build.py as a
# script; runpy then warns that the module was already imported. Harmless here: build.py has no
# import-time side effects.
warnings.filterwarnings("ignore", message="'data.build' found in sys.modules", category=RuntimeWarning)

from data.build import PRESETS, build, check_build_args  # noqa: E402
from data.check import check_run  # noqa: E402
from data.domains import DOMAINS  # noqa: E402
from data.jsonl import load_jsonl, write_jsonl  # noqa: E402
from data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

__all__ = ["DOMAINS", "PRESETS", "build", "check_build_args", "check_run", "load_jsonl", "load_tokenizer", "train_tokenizer",
           "write_jsonl"]
