"""lm-evaluation-harness tasks over ff's bundled multiple-choice questions, scored as ff scores
them (`acc` equals ff's MCQ accuracy):

    lm_eval --model hf --model_args pretrained=FOLDER,dtype=float32 \\
        --tasks ff_mcq --include_path pipelines/lm_eval_tasks

`ff_mcq` runs the four tasks ff_forget_mcq, ff_retain_mcq (the "demo" questions) and
ff_ood_forget_mcq, ff_ood_retain_mcq ("demo-ood"). The questions are read with
`pipelines.data.load_mcq`, so `featureforget` must be importable where lm_eval runs.
"""
from __future__ import annotations

from pathlib import Path

TASKS = ("ff_forget_mcq", "ff_retain_mcq", "ff_ood_forget_mcq", "ff_ood_retain_mcq")
GROUP = "ff_mcq"


def task_dir() -> Path:
    """The folder to pass to lm_eval as `--include_path` (or `TaskManager(include_path=...)`)."""
    return Path(__file__).resolve().parent
