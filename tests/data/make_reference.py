"""Writes tests/data/reference, the PyTorch reference cases the project carries itself, in the
layout of ../shared/reference (see tests/data/reference/README.md). Run by hand, not in CI, with
any Python that has torch, numpy and safetensors (e.g. a throw-away venv:
`python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy safetensors`):

    python tests/data/make_reference.py

- reference/*.safetensors: batch-normalization layer cases (train and eval, NC and NCHW, large
  offsets, no affine), made with torch.nn.functional.batch_norm: float32 inputs, float64
  expected values computed from those same float32 inputs.
- reference/grad/: whole-network gradients of two presets in float64 on a synthetic batch of
  28x28 images stored with the case, so that no data set is needed. The initial parameters are
  not stored: each is a stream of the xorshift generator of tests/common/mod.rs (`Lcg`, spelled
  out below), named in cases.json by seed, scale and offset. The expected gradients are stored in
  float32 (rounded from float64: a relative error of at most 6e-8, far below every tolerance)
  to keep the files small."""
import json, math, os, struct
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import save_file as save_unsorted

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "reference")
GRAD = os.path.join(OUT, "grad")
M64 = (1 << 64) - 1


def save_file(tensors, path, metadata):
    """safetensors' save_file with the header's keys sorted (its metadata map comes out in a
    different order on every run), so that running the script again writes identical bytes."""
    save_unsorted(tensors, path, metadata=metadata)
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"))
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode() + data[8 + n:])
    os.chmod(path, 0o644)


def err(got, want):
    """max|G - E| / max(1, max|E|), the cases' measure."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()


def rel_l2(got, want):
    got, want = got.double(), want.double()
    den = want.norm().item()
    num = (got - want).norm().item()
    return num / den if den > 0 else num


# ---------------------------------------------------------------------------------------------
# Batch-normalization layer cases


def bn_case(name, description, shape, mode, eps=1e-5, momentum=0.1, offset=0.0, spread=1.0,
            affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (offset + spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    dy = torch.randn(shape, generator=g).float()
    gamma = (1 + 0.3 * torch.randn(c, generator=g)).float()
    beta = (0.3 * torch.randn(c, generator=g)).float()
    rm = (offset + 0.5 * torch.randn(c, generator=g)).float()
    rv = (0.5 + torch.rand(c, generator=g)).float() * spread ** 2
    train = mode == "train"
    dims = [0] + list(range(2, len(shape)))

    def run(dtype):
        xx = x.to(dtype).requires_grad_()
        gg = gamma.to(dtype).requires_grad_() if affine else None
        bb = beta.to(dtype).requires_grad_() if affine else None
        rmo, rvo = rm.to(dtype).clone(), rv.to(dtype).clone()
        y = F.batch_norm(xx, rmo, rvo, gg, bb, train, momentum, eps)
        (y * dy.to(dtype)).sum().backward()
        out = {"y": y.detach(), "dx": xx.grad}
        if affine:
            out.update(dgamma=gg.grad, dbeta=bb.grad)
        if train:
            out.update(running_mean_out=rmo, running_var_out=rvo,
                       batch_mean=xx.detach().mean(dims),
                       batch_var=xx.detach().var(dims, unbiased=False))
        return out

    want, f32 = run(torch.float64), run(torch.float32)
    tensors = {"x": x, "dy": dy, "running_mean_in": rm, "running_var_in": rv}
    if affine:
        tensors.update(gamma=gamma, beta=beta)
    tensors.update({k: v.double() for k, v in want.items()})
    meta = {"op": "batch_norm", "mode": mode, "layout": "NC" if len(shape) == 2 else "NCHW",
            "eps": repr(eps), "momentum": repr(momentum), "description": description,
            "torch_f32_err_y": f"{err(f32['y'], want['y']):.3e}",
            "torch_f32_err_dx": f"{err(f32['dx'], want['dx']):.3e}",
            "generator": "tests/data/make_reference.py", "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(OUT, f"{name}.safetensors"), metadata=meta)
    print(f"{name}: PyTorch float32 error y {meta['torch_f32_err_y']}, "
          f"dx {meta['torch_f32_err_dx']}")


# ---------------------------------------------------------------------------------------------
# Whole-network gradient cases


def xorshift(seed, n, scale, offset):
    """tests/common/mod.rs `Lcg(seed).vec_f32(n, scale, offset)`, bit for bit: xorshift64
    (13, 7, 17), u = (state >> 11) / 2^53 * 2 - 1 in f64, value = f32(offset + scale * u)."""
    s, out = seed, np.empty(n, np.float64)
    for i in range(n):
        s ^= (s << 13) & M64
        s ^= s >> 7
        s ^= (s << 17) & M64
        out[i] = offset + scale * ((s >> 11) / float(1 << 53) * 2.0 - 1.0)
    return torch.from_numpy(out.astype(np.float32))


def mlp_fig1_bn():
    """The preset mlp-fig1-bn (models/mlp-fig1-bn.json) as PyTorch's nn.Sequential."""
    def block(i, o):
        return [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o), nn.Sigmoid()]
    return nn.Sequential(*block(784, 100), *block(100, 100), *block(100, 100), nn.Linear(100, 10))


class Probe:
    """Records, in the float64 pass, how close the network comes to its kinks: the smallest
    |input| of a ReLU and the smallest gap between the two largest values of a max-pool
    window (whose largest is positive). A float32 program lands on the same side of every kink
    when these are far above its rounding errors: PyTorch's float32 ReLU inputs differ from the
    float64 ones by up to 5e-6 on these cases, and KINK_MARGIN is 3e-5."""
    def __init__(self):
        self.relu, self.gap = math.inf, math.inf

    def act(self, x):
        self.relu = min(self.relu, x.detach().abs().min().item())
        return F.relu(x)

    def pool(self, x):
        n, c, h, w = x.shape
        win = x.detach().reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
        top = win.reshape(-1, 4).topk(2, dim=1).values
        top = top[top[:, 0] > 0]  # all four ReLU'd to 0: no gradient goes through the window
        self.gap = min(self.gap, (top[:, 0] - top[:, 1]).min().item())
        return F.max_pool2d(x, 2)


PROBE = Probe()
KINK_MARGIN = 3e-5


class ConvUnit(nn.Module):
    """conv (no bias) -> BN -> ReLU, as ../shared/peers/torch_inception.py names them."""
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return PROBE.act(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, cin, c1, c2r, c2, c3r, c3, c4):
        super().__init__()
        self.b1 = ConvUnit(cin, c1, 1)
        self.b2 = nn.Sequential(ConvUnit(cin, c2r, 1), ConvUnit(c2r, c2, 3))
        self.b3 = nn.Sequential(ConvUnit(cin, c3r, 1), ConvUnit(c3r, c3, 3), ConvUnit(c3, c3, 3))
        self.b4 = ConvUnit(cin, c4, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x),
                          self.b4(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionMiniBn(nn.Module):
    """The preset inception-mini-bn (models/inception-mini-bn.json)."""
    def __init__(self):
        super().__init__()
        self.stem = ConvUnit(1, 32, 3)
        self.a = Inception(32, 32, 24, 32, 16, 24, 16)
        self.b = Inception(104, 48, 32, 64, 24, 32, 32)
        self.fc = nn.Linear(176, 10)

    def forward(self, x):
        x = PROBE.pool(self.stem(x))
        x = PROBE.pool(self.a(x))
        return self.fc(self.b(x).mean((2, 3)))


def init_spec(net, first_seed, weight_scale=None):
    """seed, scale and offset of every parameter: weights and biases uniform in
    +-1/sqrt(fan_in) (PyTorch's default bound; `weight_scale` replaces it for weights), BN
    gammas in 1 +- 0.25, betas in +-0.25. Seeds are large odd numbers (a small xorshift seed
    starts with a run of values near -1)."""
    modules, spec = dict(net.named_modules()), {}
    for k, (name, p) in enumerate(net.named_parameters()):
        seed = ((first_seed + k + 1) * 0x9E3779B97F4A7C15) & M64 | 1
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            scale, offset = 0.25, (1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("weight") and weight_scale is not None:
            scale, offset = weight_scale, 0.0
        else:
            scale, offset = round(1 / math.sqrt(module.weight[0].numel()), 4), 0.0
        spec[name] = {"seed": seed, "scale": scale, "offset": offset}
    return spec


def grad_case(name, model, make, batch, first_seed, tolerance_floor, description,
              weight_scale=None, check_kinks=False, flat=False):
    global PROBE
    spec = init_spec(make(), first_seed, weight_scale)
    state = dict(make().state_dict())
    for pname, s in spec.items():
        state[pname] = xorshift(s["seed"], state[pname].numel(), s["scale"], s["offset"]) \
            .reshape(state[pname].shape)

    def net(dtype):
        m = make().to(dtype)
        m.load_state_dict(state)
        return m.train()

    def forward(m, x, dtype):
        return m(x.to(dtype).flatten(1) if flat else x.to(dtype))

    # The first batch of noise images that keeps clear of the kinks.
    for data_seed in range(1000):
        g = torch.Generator().manual_seed(100 * first_seed + data_seed)
        x = torch.rand(batch, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (batch,), generator=g)
        PROBE = Probe()
        with torch.no_grad():
            forward(net(torch.float64), x, torch.float64)
        probe = PROBE
        if not check_kinks or min(probe.relu, probe.gap) > KINK_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no batch keeps clear of the kinks")

    def gradients(dtype):
        m = net(dtype)
        loss = F.cross_entropy(forward(m, x, dtype), labels)
        names = [n for n, _ in m.named_parameters()]
        return loss.detach(), dict(zip(names, torch.autograd.grad(loss, list(m.parameters()))))

    loss64, g64 = gradients(torch.float64)
    _, g32 = gradients(torch.float32)
    f32_worst = max(rel_l2(g32[n], g64[n]) for n in g64)
    tol = max(tolerance_floor, 4 * f32_worst)
    expected = {n: v.float().contiguous() for n, v in g64.items()}
    expected["loss"] = loss64.reshape(1)
    meta = {"generator": "tests/data/make_reference.py", "torch": torch.__version__,
            "description": description}
    save_file(expected, os.path.join(GRAD, f"{name}.grad.safetensors"), metadata=meta)
    save_file({"x": x.contiguous(), "labels": labels},
              os.path.join(GRAD, f"{name}.batch.safetensors"), metadata=meta)
    case = {"kind": "gradient", "model": model, "data": "synthetic",
            "batch": f"{name}.batch.safetensors", "offset": 0, "batch_size": batch,
            "init_xorshift": spec, "expected": f"{name}.grad.safetensors",
            "tolerance_rel_l2": float(f"{tol:.3g}"),
            "torch_f32_worst_rel_l2": float(f"{f32_worst:.4g}"), "description": description}
    if check_kinks:
        case["min_relu_input"] = float(f"{probe.relu:.3g}")
        case["min_max_pool_gap"] = float(f"{probe.gap:.3g}")
    print(f"{name}: loss {loss64.item():.6f}, PyTorch float32 worst {f32_worst:.3e}, "
          f"tolerance {tol:.3g}" + (f", batch seed {data_seed}: |ReLU input| >= "
                                    f"{probe.relu:.2e}, max-pool gap >= {probe.gap:.2e}"
                                    if check_kinks else ""))
    return case


def main():
    torch.manual_seed(0)
    os.makedirs(GRAD, exist_ok=True)
    bn_case("bn1d_train", "fully connected features, batch 12", (12, 5), "train", seed=1)
    bn_case("bn1d_eval", "fully connected inference with running statistics", (6, 5), "eval",
            seed=2)
    bn_case("bn1d_train_pair", "smallest batch that training allows", (2, 4), "train", seed=3)
    bn_case("bn1d_train_no_affine", "no gamma or beta (affine=False)", (8, 3), "train",
            affine=False, seed=4)
    bn_case("bn1d_train_offset", "mean 1e4, spread 1e-2: E[x^2] - E[x]^2 in f32 fails here",
            (32, 4), "train", offset=1e4, spread=1e-2, seed=5)
    bn_case("bn2d_train", "per feature map over batch and positions, odd batch", (3, 3, 4, 5),
            "train", seed=6)
    bn_case("bn2d_eval", "convolutional inference", (2, 3, 4, 3), "eval", seed=7)
    bn_case("bn2d_train_offset", "mean -1e4, spread 5e-2, per feature map", (4, 2, 3, 3), "train",
            offset=-1e4, spread=5e-2, seed=8)
    bn_case("bn2d_train_eps_momentum", "Keras-like eps, slow running average", (2, 4, 3, 3),
            "train", eps=1e-3, momentum=0.01, seed=9)
    bn_case("bn2d_eval_offset", "inference far from zero", (2, 2, 3, 2), "eval", offset=1e3,
            spread=0.1, seed=10)

    cases = {
        "mlp_bn_synthetic": grad_case(
            "mlp_bn_synthetic", "mlp-fig1-bn", mlp_fig1_bn, 9, 11, 5e-5,
            "mlp-fig1-bn, weights uniform in +-0.17 (std 0.1 as the preset), 9 noise images",
            weight_scale=0.17, flat=True),
        "inception_bn_synthetic": grad_case(
            "inception_bn_synthetic", "inception-mini-bn", InceptionMiniBn, 3, 12, 5e-5,
            "inception-mini-bn, 3 noise images (odd batch), clear of ReLU and max-pool kinks",
            check_kinks=True),
    }
    with open(os.path.join(GRAD, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
