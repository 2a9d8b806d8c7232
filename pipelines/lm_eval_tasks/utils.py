"""Documents of the ff multiple-choice tasks for lm-evaluation-harness (loaded by path from the
YAMLs next to this file: `custom_dataset: !function utils.mcq_dataset`)."""
from __future__ import annotations

from typing import Any


def mcq_dataset(spec: str = "demo", role: str = "forget", **_: Any) -> Any:
    """The questions of an ff MCQ spec (`pipelines.data.load_mcq`: "demo", "demo-ood", a JSONL
    file or a dataset id) as a DatasetDict with one "test" split of {"question", "choices",
    "answer"} rows, in ff's order. Extra keyword arguments (lm-eval's metadata) are ignored."""
    import datasets

    from pipelines.data import load_mcq

    rows = [q._asdict() for q in load_mcq(spec, role)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
