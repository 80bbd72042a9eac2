"""hf_sp: starting-point regularization (L2-SP and friends) for the Hugging Face Trainer.

Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018 (arXiv:1802.01483).
"""

from .config import SPConfig, SPTrainingArguments
from .fisher import check_fisher, estimate_fisher, load_fisher, save_fisher
from .models import wrap_timm_model
from .penalties import get_penalty, get_penalty_info, list_penalties, register_penalty
from .selection import find_head_modules, split_parameters
from .trainer import SPTrainer

__version__ = "0.1.0"

__all__ = [
    "SPConfig",
    "SPTrainer",
    "SPTrainingArguments",
    "check_fisher",
    "estimate_fisher",
    "find_head_modules",
    "get_penalty",
    "get_penalty_info",
    "list_penalties",
    "load_fisher",
    "register_penalty",
    "save_fisher",
    "split_parameters",
    "wrap_timm_model",
]
