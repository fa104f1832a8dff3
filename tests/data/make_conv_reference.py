"""Writes conv_reference.safetensors, the PyTorch reference that tests/conv_layers.rs compares
against. Run by hand (not in CI) with any Python that has torch and safetensors:

    python tests/data/make_conv_reference.py

For each case NAME it stores NAME.x (input), the parameters, NAME.dy (upstream gradient) and
PyTorch's NAME.y, NAME.dx and parameter gradients (NAME.dweight, NAME.dbias), with the loss
sum(y * dy). Inputs are rounded to multiples of 1/64 so max-pool windows have no near-ties."""
import torch, torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
out = {}

def conv_case(name, n, c, h, w, o, k, s, p, bias):
    x = torch.randn(n, c, h, w, requires_grad=True)
    wt = (torch.randn(o, c, k, k) * 0.3).requires_grad_()
    b = (torch.randn(o) * 0.3).requires_grad_() if bias else None
    y = F.conv2d(x, wt, b, stride=s, padding=p)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    out.update({f"{name}.x": x, f"{name}.weight": wt, f"{name}.dy": dy, f"{name}.y": y,
                f"{name}.dx": x.grad, f"{name}.dweight": wt.grad})
    if bias:
        out.update({f"{name}.bias": b, f"{name}.dbias": b.grad})

def pool_case(name, f, n, c, h, w):
    x = (torch.randperm(n * c * h * w).float() / 64 - 2).reshape(n, c, h, w).requires_grad_()
    y = f(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    out.update({f"{name}.x": x, f"{name}.dy": dy, f"{name}.y": y, f"{name}.dx": x.grad})

conv_case("conv_s2", 2, 3, 7, 6, 4, 3, 2, 1, True)
conv_case("conv_s1", 3, 2, 5, 8, 3, 3, 1, 1, False)
conv_case("conv_1x1", 2, 5, 4, 3, 6, 1, 1, 0, True)
pool_case("maxpool", lambda x: F.max_pool2d(x, 2), 2, 3, 6, 8)
pool_case("avgpool", lambda x: F.avg_pool2d(x, 3, 1, 1), 2, 3, 5, 6)
save_file({k: v.detach().contiguous() for k, v in out.items()}, "conv_reference.safetensors",
          metadata={"generator": "make_conv_reference.py", "torch": torch.__version__})
