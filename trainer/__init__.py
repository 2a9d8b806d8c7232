"""The `ff train` engine: a dual-objective SAE trained offline on cached activations.

Nothing here imports `transformers` (docs/architecture.md): training runs from the stores
alone. Heavy modules are imported where used, so `import trainer` stays cheap:

    from trainer.config import TrainConfig
    from trainer.train import train
    summary = train(TrainConfig.preset("demo"), "stores/demo.zarr", layer=6, out="runs/ff")
"""

from trainer.errors import NonFiniteLossError, TrainError

__all__ = ["NonFiniteLossError", "TrainError"]
