"""Stand-in for torchvision.models.resnet50 (see ../torch/__init__.py)."""
import torch

__version__ = "0.0-fake"


class models:
    @staticmethod
    def resnet50(weights=None):
        class R(torch.nn.Module):
            def forward(self, x):
                torch._work(10)
                return torch.Tensor()
        return R()
