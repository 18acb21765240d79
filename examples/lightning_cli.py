"""LightningCLI with AdamMonitor added from a YAML config by class_path.

python examples/lightning_cli.py fit --config examples/adam_monitor.yaml
"""

from lightning.pytorch.cli import LightningCLI
from quickstart import RegressionData, Regressor

if __name__ == "__main__":
    LightningCLI(Regressor, RegressionData)
