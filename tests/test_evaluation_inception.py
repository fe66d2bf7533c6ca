"""Flax Inception v3 against a plain-torch reference of torchvision's / pytorch-fid's blocks.

torchvision cannot be imported beside this torch, so the reference blocks are written
here from torchvision's `inception.py` and pytorch-fid's `FIDInception*` patches. Inputs
are 107 px: the smallest side where Mixed_7b/7c see 2x2 maps, so the max-pool of
pytorch-fid's last block and the padding-excluded averages differ from torchvision's.
"""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nsync_jax.evaluation import inception, weights

SIZE = 107
_APPLY = {}  # One compiled forward per variant, shared by the tests.


def _apply(variant, params, x):
    if variant not in _APPLY:
        model = inception.InceptionV3(variant)
        _APPLY[variant] = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return np.asarray(_APPLY[variant](params, x))


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x, fid):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class A(nn.Module):
    def __init__(self, cin, pool_features, fid):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg(x, self.fid)),
            ],
            1,
        )


class B(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, stride=2)], 1)


class C(nn.Module):
    def __init__(self, cin, c7, fid):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        d = self.branch7x7dbl_5(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x, self.fid))], 1)


class D(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3):
            b7 = layer(b7)
        b7 = self.branch7x7x3_4(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class E(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "include", "exclude" or "max"
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            p = _avg(x, self.pool == "exclude")
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class TorchInception(nn.Module):
    """torchvision's Inception3 trunk; `fid=True` applies pytorch-fid's block patches."""

    def __init__(self, fid):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = A(192, 32, fid)
        self.Mixed_5c = A(256, 64, fid)
        self.Mixed_5d = A(288, 64, fid)
        self.Mixed_6a = B(288)
        self.Mixed_6b = C(768, 128, fid)
        self.Mixed_6c = C(768, 160, fid)
        self.Mixed_6d = C(768, 160, fid)
        self.Mixed_6e = C(768, 192, fid)
        self.Mixed_7a = D(768)
        self.Mixed_7b = E(1280, "exclude" if fid else "include")
        self.Mixed_7c = E(2048, "max" if fid else "include")
        self.fc = nn.Linear(2048, 1008 if fid else 1000)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _random_net(fid: bool) -> TorchInception:
    """Random weights that keep activations O(1): He-normal convs, jittered BatchNorm."""
    torch.manual_seed(0)
    net = TorchInception(fid)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            nn.init.normal_(m.running_mean, 0.0, 0.1)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Multi-threaded oneDNN spends seconds preparing each new conv shape on a first call;
    # one thread runs the whole reference forward in ~0.1 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs():
    return torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, SIZE, SIZE))).float()


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_flax_inception_matches_torch_reference(variant, inputs):
    net = _random_net(variant == "pytorch_fid")
    with torch.no_grad():
        expected = net(inputs).numpy()
    flat = {k: v.numpy() for k, v in net.state_dict().items()}
    params = inception.params_from_state_dict(flat, variant)
    nhwc = inputs.numpy().transpose(0, 2, 3, 1)
    got = _apply(variant, params, nhwc)
    assert got.shape == (2, inception.FEATURE_DIM) and 0.1 < expected.std() < 100
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # The other variant's pooling gives different features from the same weights.
    other = [v for v in inception.VARIANTS if v != variant][0]
    got_other = _apply(other, params, nhwc)
    assert np.abs(got_other - expected).max() > 1e-2 * np.abs(expected).max()


def test_weight_files_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    state = TorchInception(fid=True).state_dict()
    flat = {k: v.numpy() for k, v in state.items()}
    pth = str(tmp_path / "pt_inception.pth")
    torch.save(state, pth)
    weights.save_flat(str(tmp_path / "w.safetensors"), flat)
    weights.save_flat(str(tmp_path / "w.npz"), flat)
    reference = inception.load_params(pth, "pytorch_fid")
    for name in ("w.safetensors", "w.npz"):
        loaded = inception.load_params(str(tmp_path / name), "pytorch_fid")
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(loaded), strict=True):
            np.testing.assert_array_equal(a, b)
    kernel = reference["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        kernel, flat["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    # fc has 1008 classes: the FID weights, not torchvision's.
    with pytest.raises(weights.WeightsError, match="inception_variant"):
        inception.load_params(pth, "torchvision")
    broken = dict(flat)
    del broken["Mixed_5b.branch_pool.bn.running_var"]
    weights.save_flat(str(tmp_path / "broken.npz"), broken)
    with pytest.raises(
        weights.WeightsError,
        match=r"inception.*broken\.npz.*Mixed_5b\.branch_pool\.bn\.running_var",
    ):
        inception.load_params(str(tmp_path / "broken.npz"), "pytorch_fid")
    with pytest.raises(FileNotFoundError, match="inception"):
        inception.load_params(str(tmp_path / "missing.pth"), "pytorch_fid")


def test_resize_matches_torch_bilinear():
    image = np.random.default_rng(2).uniform(size=(37, 53, 3)).astype(np.float32)
    for h, w in ((299, 299), (20, 31)):
        expected = (
            F.interpolate(
                torch.from_numpy(image).permute(2, 0, 1)[None],
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )[0]
            .permute(1, 2, 0)
            .numpy()
        )
        np.testing.assert_allclose(
            inception.resize_bilinear_torch(image, h, w), expected, atol=1e-5
        )


def test_preprocess_ranges_and_sizes():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 90, 3), np.uint8))
    for variant in inception.VARIANTS:
        x = inception.preprocess(image, variant)
        assert x.shape == (299, 299, 3), variant
        # [-1, 1], and all of it: a random image has pixels near 0 and 255.
        assert -1.0 <= x.min() < -0.9, variant
        assert 0.9 < x.max() <= 1.0, variant


def test_preprocess_keeps_the_whole_image_or_centre_crops():
    # A wide image, red with green outer eighths. pytorch-fid stretches the whole image to
    # 299 x 299 (its edges stay green); torchvision scales the shorter side to 299 (64 x 40
    # to 478 x 299), then the centre crop drops 89 columns each side: the green is cut away.
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[..., 0] = 255
    pixels[:, :8] = pixels[:, -8:] = (0, 255, 0)
    image = Image.fromarray(pixels)
    red, green = np.array([1.0, -1.0, -1.0]), np.array([-1.0, 1.0, -1.0])

    whole = inception.preprocess(image, "pytorch_fid")
    expected = F.interpolate(
        torch.from_numpy(pixels / np.float32(255.0)).permute(2, 0, 1)[None],
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(whole, 2.0 * expected.numpy() - 1.0, atol=1e-5)
    # Output columns 0-34 and 264-298 read only source columns 0-7 and 56-63.
    np.testing.assert_allclose(whole[:, :35], np.broadcast_to(green, (299, 35, 3)), atol=1e-6)
    np.testing.assert_allclose(whole[:, -35:], np.broadcast_to(green, (299, 35, 3)), atol=1e-6)
    np.testing.assert_allclose(whole[:, 149], np.broadcast_to(red, (299, 3)), atol=1e-6)

    cropped = inception.preprocess(image, "torchvision")
    np.testing.assert_allclose(cropped, np.broadcast_to(red, (299, 299, 3)), atol=1e-6)


def test_trunk_has_torchvisions_parameter_count():
    # torchvision's inception_v3 has 27,161,264 parameters; minus fc (2048·1000 + 1000) and
    # AuxLogits (3,326,696) leaves the pool3 trunk. BatchNorm statistics are buffers there.
    shapes = inception.param_shapes("torchvision", size=299)
    count = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
        if not weights.path_name(path).endswith(("/mean", "/var"))
    )
    assert count == 27_161_264 - 2_049_000 - 3_326_696
