"""sn_ext.conv_spectral_norm: spectral normalization by the convolution operator's norm.

Oracles, all independent of sn_ext's code: the convolution's dense matrix, built column by column from the plain
layer's forward on the basis inputs (its largest singular value is the exact operator norm; its transpose gives
the reference power iteration), the FFT singular values of circular convolutions (Sedghi et al. 2019), and a
float64 autograd reference of W / sigma(W) written with the plain layer. Small shapes, float64 unless noted.
"""

import copy
import re

import pytest
import torch
import torch._dynamo
from helpers import assert_rel, linear_map_matrix
from torch import nn
from torch.nn.utils import parametrize

import sn_ext
from sn_ext.nn.conv_operator import ConvLayer

# (id, layer, input shape (channels, *spatial)): Conv1d/2d/3d and transposes, strides 1-3, every padding mode,
# "same" with an even kernel (asymmetric padding), dilation, groups, output padding (also >= stride).
CONFIGS = [
    ("conv1d", lambda: nn.Conv1d(2, 3, 3), (2, 9)),
    ("conv1d_s2_p1", lambda: nn.Conv1d(2, 3, 4, stride=2, padding=1), (2, 10)),
    ("conv1d_s3_reflect", lambda: nn.Conv1d(2, 3, 3, stride=3, padding=2, padding_mode="reflect"), (2, 11)),
    ("conv1d_dilation_groups", lambda: nn.Conv1d(4, 6, 3, dilation=2, padding=2, groups=2), (4, 8)),
    ("conv1d_s2_circular", lambda: nn.Conv1d(2, 2, 3, stride=2, padding=1, padding_mode="circular"), (2, 9)),
    ("conv2d", lambda: nn.Conv2d(2, 3, 3), (2, 6, 6)),
    ("conv2d_s2", lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 6)),
    ("conv2d_s3", lambda: nn.Conv2d(2, 3, 3, stride=3, padding=1), (2, 8, 7)),
    ("conv2d_same_even_kernel", lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 5, 5)),
    ("conv2d_dilation", lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=1), (2, 7, 7)),
    ("conv2d_s2_groups", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 5, 6)),
    ("conv2d_s2_reflect", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"), (2, 6, 5)),
    ("conv2d_s3_replicate", lambda: nn.Conv2d(2, 3, 3, stride=3, padding=2, padding_mode="replicate"), (2, 7, 7)),
    ("conv2d_circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 5, 5)),
    (
        "conv2d_same_reflect_dilation",
        lambda: nn.Conv2d(2, 2, (2, 3), padding="same", dilation=(1, 2), padding_mode="reflect"),
        (2, 5, 6),
    ),
    ("conv3d", lambda: nn.Conv3d(2, 2, 2), (2, 3, 4, 3)),
    ("conv3d_s2_replicate", lambda: nn.Conv3d(1, 2, 3, stride=2, padding=1, padding_mode="replicate"), (1, 5, 4, 4)),
    ("conv3d_s3", lambda: nn.Conv3d(1, 2, 2, stride=3, padding=1), (1, 5, 5, 4)),
    ("conv_transpose1d_s2", lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), (3, 6)),
    ("conv_transpose1d_s3", lambda: nn.ConvTranspose1d(2, 2, 4, stride=3, padding=1, output_padding=2), (2, 5)),
    (
        "conv_transpose1d_outpad_over_stride",
        lambda: nn.ConvTranspose1d(2, 2, 3, dilation=3, output_padding=2),
        (2, 5),
    ),
    ("conv_transpose2d", lambda: nn.ConvTranspose2d(3, 2, 3), (3, 4, 4)),
    ("conv_transpose2d_s2", lambda: nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1), (4, 4, 3)),
    (
        "conv_transpose2d_s3_groups_dilation",
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=3, dilation=2, groups=2, output_padding=1),
        (4, 3, 3),
    ),
    (
        "conv_transpose2d_s2_outpad_over_stride",
        lambda: nn.ConvTranspose2d(2, 2, 2, stride=2, dilation=3, output_padding=2),
        (2, 3, 3),
    ),
    ("conv_transpose3d_s2", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 3, 2, 2)),
    ("conv_transpose3d_s3", lambda: nn.ConvTranspose3d(1, 2, 3, stride=3, padding=1, output_padding=1), (1, 2, 3, 2)),
]
IDS = [c[0] for c in CONFIGS]
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
PARAMS = [c[1:] for c in CONFIGS]


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of rounds on tiny tensors: threads only add synchronisation (10x slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plain(make, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().double()


def _operator_matrix(plain: nn.Module, input_shape: tuple) -> torch.Tensor:
    """The layer less its bias as a dense matrix, from the plain layer's own forward."""
    layer = copy.deepcopy(plain)
    layer.bias = None
    with torch.no_grad():
        return linear_map_matrix(layer, (1, *input_shape))


def _norm(layer: nn.Module):
    return layer.parametrizations.weight[0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x)


# ---------------------------------------------------------------------------------------------------------------
# The operator and its norm


@pytest.mark.parametrize("make,input_shape", PARAMS, ids=IDS)
def test_sigma_converges_to_the_exact_operator_norm(make, input_shape):
    plain = _plain(make)
    exact = torch.linalg.svdvals(_operator_matrix(plain, input_shape))[0]
    layer = sn_ext.conv_spectral_norm(copy.deepcopy(plain), input_shape, n_power_iterations=1000)
    layer(torch.randn(2, *input_shape, dtype=torch.float64))
    sigma = sn_ext.sigmas(layer)["weight"]
    assert_rel(sigma, exact, 1e-5, "sigma vs the largest singular value of the operator's matrix")


def _circular_singular_values(weight: torch.Tensor, sizes: tuple, dilation: tuple) -> torch.Tensor:
    """Sedghi et al. 2019: a stride-1 circular convolution's singular values are those of the (out, in) matrices of
    the kernel's n-point DFT (taps at multiples of the dilation), one per frequency."""
    kernel = weight.new_zeros(*weight.shape[:2], *sizes)
    taps = tuple(slice(0, d * (k - 1) + 1, d) for k, d in zip(weight.shape[2:], dilation))
    kernel[(slice(None), slice(None), *taps)] = weight
    spatial = tuple(range(2, weight.dim()))
    per_frequency = torch.fft.fftn(kernel, dim=spatial).permute(*spatial, 0, 1)
    return torch.linalg.svdvals(per_frequency).flatten()


@pytest.mark.parametrize(
    "make,input_shape",
    [
        (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 7)),
        (lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"), (3, 6, 5)),
        (lambda: nn.Conv2d(2, 2, (3, 2), padding=(2, 1), dilation=(2, 2), padding_mode="circular"), (2, 7, 6)),
        (lambda: nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular"), (2, 4, 4, 3)),
    ],
    ids=["1d", "2d", "2d_dilated_even", "3d"],
)
def test_circular_padding_against_fft_singular_values(make, input_shape):
    plain = _plain(make)
    fft = _circular_singular_values(plain.weight.detach(), input_shape[1:], plain.dilation)
    dense = torch.linalg.svdvals(_operator_matrix(plain, input_shape))
    assert_rel(fft.sort(descending=True).values, dense, 1e-12, "FFT vs dense singular values")
    layer = sn_ext.conv_spectral_norm(copy.deepcopy(plain), input_shape, n_power_iterations=1000)
    layer(torch.randn(1, *input_shape, dtype=torch.float64))
    assert_rel(sn_ext.sigmas(layer)["weight"], fft.max(), 1e-5, "sigma vs the FFT's largest singular value")


def _adjoint_cases():
    """CONFIGS and a sweep: every padding mode x stride 1-3 x dilation 1-2 x padding 0-2 x odd and even sizes,
    and transposes with every valid output padding."""
    cases = [(make(), shape) for _, make, shape in CONFIGS]
    for mode in ("zeros", "reflect", "replicate", "circular"):
        for stride in (1, 2, 3):
            for dilation in (1, 2):
                for padding in (0, 1, 2):
                    for n in (5, 6, 7):
                        cases.append((nn.Conv1d(4, 2, 3, stride, padding, dilation, 2, padding_mode=mode), (4, n)))
    for stride in (1, 2, 3):
        for dilation in (1, 2, 3):
            for output_padding in range(max(stride, dilation)):
                conv = nn.ConvTranspose2d(2, 3, (3, 2), (stride, 1), (1, 0), (output_padding, 0), dilation=dilation)
                cases.append((conv, (2, 3, 4)))
    return cases


def test_adjoint_is_the_transpose_for_every_configuration():
    torch.manual_seed(0)
    checked = 0
    for conv, input_shape in _adjoint_cases():
        conv = conv.double()
        operator = ConvLayer.of(conv).operator(conv.weight.shape, input_shape)
        w = conv.weight.detach()
        x = torch.randn(2, *input_shape, dtype=torch.float64)
        y = torch.randn(2, *operator.output_shape, dtype=torch.float64)
        ax = operator.forward(x, w)
        bias = conv.bias.detach().view(-1, *[1] * (x.dim() - 2))
        assert torch.allclose(ax, conv(x) - bias, rtol=1e-12, atol=1e-12), conv  # the layer's own map
        aty = operator.adjoint(y, w)
        assert aty.shape == x.shape, (conv, input_shape)
        lhs, rhs = (ax * y).sum(), (x * aty).sum()
        assert abs(lhs - rhs) <= 1e-12 * (ax.norm() * y.norm()), (conv, input_shape, float(lhs), float(rhs))
        checked += 1
    assert checked > 200


# ---------------------------------------------------------------------------------------------------------------
# The parametrization


@pytest.mark.parametrize("make,input_shape", PARAMS[::3], ids=IDS[::3])
def test_train_step_is_one_power_iteration_and_eval_none(make, input_shape):
    plain = _plain(make)
    matrix = _operator_matrix(plain, input_shape)
    layer = sn_ext.conv_spectral_norm(copy.deepcopy(plain), input_shape)
    norm = _norm(layer)
    x = torch.randn(3, *input_shape, dtype=torch.float64)
    v0 = norm._v.clone()
    out = layer(x)
    u1 = _unit(matrix @ v0.flatten())
    v1 = _unit(matrix.T @ u1)
    assert_rel(norm._u.flatten(), u1, 1e-12, "u after a train step")
    assert_rel(norm._v.flatten(), v1, 1e-12, "v after a train step")
    sigma = u1 @ matrix @ v1
    assert_rel(sn_ext.sigmas(layer)["weight"], sigma, 1e-12, "sigma = <u, A v>")
    plain_sn = copy.deepcopy(plain)
    with torch.no_grad():
        plain_sn.weight.div_(sigma)
    assert_rel(out, plain_sn(x), 1e-12, "output = the plain layer with W / sigma")
    layer.eval()
    u, v = norm._u.clone(), norm._v.clone()
    assert_rel(layer(x), out, 1e-12, "eval output")
    assert torch.equal(norm._u, u) and torch.equal(norm._v, v), "eval mode iterates"


@pytest.mark.parametrize("make,input_shape", PARAMS[1::3], ids=IDS[1::3])
@pytest.mark.parametrize("coeff", [None, 0.3, 100.0], ids=["plain", "bounded_active", "bounded_idle"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_matches_float64_autograd_of_w_over_sigma(make, input_shape, coeff, mode):
    plain = _plain(make)
    layer = sn_ext.conv_spectral_norm(copy.deepcopy(plain), input_shape, coeff=coeff).train(mode == "train")
    norm = _norm(layer)
    x = torch.randn(2, *input_shape, dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # The reference: u, v fixed at the values the forward used (the updated buffers), sigma(W) = <u, A_W v>
    # through the plain layer's forward, W_hat = W / sigma or W / max(1, sigma / coeff), all by autograd.
    u, v = norm._u.detach(), norm._v.detach()
    weight = plain.weight.detach().clone().requires_grad_()
    no_bias = {"bias": torch.zeros_like(plain.bias)}
    sigma = (u * torch.func.functional_call(plain, {"weight": weight, **no_bias}, (v.unsqueeze(0),))[0]).sum()
    factor = sigma if coeff is None else torch.clamp(sigma / coeff, min=1.0)
    ref = torch.func.functional_call(plain, {"weight": weight / factor}, (x,))
    (ref * g).sum().backward()
    assert_rel(out, ref, 1e-12, "output")
    assert_rel(layer.parametrizations.weight.original.grad, weight.grad, 1e-11, "weight gradient")
    if coeff == 100.0:  # sigma < coeff: the layer is left as it is, gradient included
        assert torch.equal(layer.weight, layer.parametrizations.weight.original)


def test_bounded_mode():
    plain = _plain(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1))
    layer = sn_ext.conv_spectral_norm(copy.deepcopy(plain), (2, 6, 6), coeff=0.5).eval()
    sigma = float(sn_ext.sigmas(layer)["weight"])
    assert sigma > 0.5
    assert_rel(layer.weight, plain.weight * 0.5 / sigma, 1e-12, "W * coeff / sigma above the bound")
    idle = sn_ext.conv_spectral_norm(copy.deepcopy(plain), (2, 6, 6), coeff=2 * sigma).eval()
    assert torch.equal(idle.weight, plain.weight), "identity below the bound"


@pytest.mark.parametrize("bad", [float("nan"), 0.0], ids=["nan", "zero"])
@pytest.mark.parametrize("coeff", [None, 1.0])
def test_degenerate_weight_leaves_u_and_v(bad, coeff):
    layer = sn_ext.conv_spectral_norm(_plain(lambda: nn.Conv2d(2, 3, 3)), (2, 5, 5), coeff=coeff)
    norm = _norm(layer)
    u, v = norm._u.clone(), norm._v.clone()
    with torch.no_grad():
        layer.parametrizations.weight.original.fill_(bad)
    out = layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert torch.equal(norm._u, u) and torch.equal(norm._v, v)
    if bad != bad or coeff is None:  # NaN weight, or 0 / sigma = 0: NaN, as torch's spectral norm
        assert out.isnan().any()
    else:
        assert torch.isfinite(out).all()  # a zero weight under a bound: max(1, 0 / coeff) = 1


def test_state_dict_round_trip():
    torch.manual_seed(0)
    layer = sn_ext.conv_spectral_norm(nn.ConvTranspose2d(3, 2, 3, stride=3, padding=1).double())
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    layer(x, output_size=[12, 14])  # an output padding of (2, 1), from output_size
    state = layer.state_dict()
    assert list(state) == [
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0._u",
        "parametrizations.weight.0._v",
    ]
    assert state["parametrizations.weight.0._u"].shape == (2, 12, 14)  # output-shaped
    assert state["parametrizations.weight.0._v"].shape == (3, 4, 5)  # input-shaped
    layer.eval()
    expected = layer(x, output_size=[12, 14])
    built = sn_ext.conv_spectral_norm(nn.ConvTranspose2d(3, 2, 3, stride=3, padding=1).double(), (3, 4, 5))
    with pytest.raises(RuntimeError, match="size mismatch"):  # built for output padding 0: another u shape
        built.load_state_dict(state)
    for fresh in (nn.ConvTranspose2d(3, 2, 3, stride=3, padding=1), nn.ConvTranspose2d(3, 2, 3, 3, 1, (2, 1))):
        lazy = sn_ext.conv_spectral_norm(fresh.double())
        assert "parametrizations.weight.0._u" not in lazy.state_dict()  # no input seen yet: nothing to save
        lazy.load_state_dict(state)  # builds from the checkpoint's shapes (output padding (2, 1) from u's)
        assert _norm(lazy).operator.output_padding == (2, 1)
        for key, value in lazy.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert torch.equal(lazy.eval()(x, output_size=[12, 14]), expected)
        lazy.train()(x, output_size=[12, 14])  # and trains on


def test_state_dict_load_errors_name_the_key():
    layer = sn_ext.conv_spectral_norm(nn.Conv2d(3, 2, 3).double(), (3, 6, 6))
    state = layer.state_dict()
    wrong_u = dict(state, **{"parametrizations.weight.0._u": torch.zeros(2, 3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"parametrizations\.weight\.0\._u has shape \(2, 3, 3\).*\(2, 4, 4\)"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 2, 3).double()).load_state_dict(wrong_u)
    wrong_v = dict(state, **{"parametrizations.weight.0._v": torch.zeros(4, 6, 6, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"parametrizations\.weight\.0\._v does not fit.*4 channels"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 2, 3).double()).load_state_dict(wrong_v)


def test_lazy_input_shape_and_stale_size_error():
    torch.manual_seed(0)
    layer = sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    with pytest.raises(RuntimeError, match="has not seen yet: call the layer once, or pass input_shape="):
        layer.weight
    assert sn_ext.sigmas(layer) == {}
    layer(torch.randn(3, 8, 8))  # unbatched: (channels, *spatial) is the shape
    norm = _norm(layer)
    assert norm._v.shape == (3, 8, 8) and norm._u.shape == (4, 4, 4)
    layer(torch.randn(5, 3, 8, 8))  # another batch size is the same operator
    message = (
        "conv_spectral_norm: Conv2d(3, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)) normalizes by its "
        "operator norm on inputs of shape (3, 8, 8) (channels, *spatial) and got an input of shape (3, 9, 8)"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)) as error:
        layer(torch.randn(2, 3, 9, 8))
    assert "remove_parametrizations" in str(error.value) and "input_shape=(3, 9, 8)" in str(error.value)
    transposed = sn_ext.conv_spectral_norm(nn.ConvTranspose1d(2, 2, 3, stride=2), (2, 5))
    transposed(torch.randn(1, 2, 5))
    with pytest.raises(RuntimeError, match=r"with output padding \(1,\) \(built with \(0,\)\)"):
        transposed(torch.randn(1, 2, 5), output_size=[12])


def test_first_registration_draws_and_warms_up_as_torch():
    """torch's order of draws (u, then v), 15 warm-up rounds at creation, then n more in torch's check (train)."""
    plain = _plain(lambda: nn.Conv1d(2, 3, 3, stride=2))
    matrix = _operator_matrix(plain, (2, 9))
    torch.manual_seed(7)
    layer = sn_ext.conv_spectral_norm(copy.deepcopy(plain), (2, 9), n_power_iterations=2)
    torch.manual_seed(7)
    u = _unit(torch.randn(3 * 4, dtype=torch.float64))
    v = _unit(torch.randn(2 * 9, dtype=torch.float64))
    for _ in range(15 + 2):
        u = _unit(matrix @ v)
        v = _unit(matrix.T @ u)
    assert_rel(_norm(layer)._u.flatten(), u, 1e-12, "u")
    assert_rel(_norm(layer)._v.flatten(), v, 1e-12, "v")


def test_cached_and_remove_parametrizations():
    layer = sn_ext.conv_spectral_norm(_plain(lambda: nn.Conv2d(2, 3, 3, padding=1)), (2, 5, 5))
    with parametrize.cached():  # one computation, one round, for every read inside
        first = layer.weight
        u = _norm(layer)._u.clone()
        assert layer.weight is first and torch.equal(_norm(layer)._u, u)
    layer.eval()
    weight_sn = layer.weight.detach().clone()
    parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Conv2d and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight.detach(), weight_sn)
    layer(torch.randn(1, 2, 7, 7, dtype=torch.float64))  # the size check left with it
    sn_ext.conv_spectral_norm(layer, (2, 7, 7))  # and a new one, for the new size
    layer(torch.randn(1, 2, 7, 7, dtype=torch.float64))


def test_two_forwards_then_one_backward_and_deepcopy():
    layer = sn_ext.conv_spectral_norm(_plain(lambda: nn.Conv2d(2, 3, 3)), (2, 5, 5))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    (layer(x).sum() + layer(x).sum()).backward()  # D(real) + D(fake): buffers updated between, graph intact
    evaluated = layer.eval()(x)  # an eval forward's graph, then a train step updates the buffers in place
    (evaluated.sum() + layer.train()(x).sum()).backward()
    twin = copy.deepcopy(layer)
    assert _norm(twin).operator == _norm(layer).operator and torch.equal(twin(x), layer(x))
    with pytest.raises(RuntimeError, match="got an input of shape"):
        twin(torch.randn(1, 2, 6, 6, dtype=torch.float64))  # the copy's hook checks the copy


def test_float32_and_bfloat16_follow_the_weight_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layer = sn_ext.conv_spectral_norm(nn.Conv2d(2, 3, 3).to(dtype), (2, 6, 6))
        out = layer(torch.randn(1, 2, 6, 6, dtype=dtype))
        norm = _norm(layer)
        assert out.dtype == layer.weight.dtype == norm._u.dtype == norm._v.dtype == dtype
        assert norm._sigma.dtype == torch.float32  # summed in float32, as sn_ext's kernels
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(1, 2, 6, 6, dtype=dtype)).dtype == torch.bfloat16


def test_cost_is_the_power_iterations_convolutions_plus_one():
    """Train forward: 2 convolutions per round and 1 for sigma; eval: 1; backward: sigma's weight gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    layer = sn_ext.conv_spectral_norm(nn.Conv2d(2, 3, 3, stride=2), (2, 7, 7), n_power_iterations=3)
    original = layer.parametrizations.weight.original
    for training, convolutions in ((True, 7), (False, 1)):
        layer.train(training)
        with Count() as count:
            weight = layer.weight
        assert count.calls.count("convolution") == convolutions, count.calls
        with Count() as count:
            weight.sum().backward()
        assert count.calls.count("convolution_backward") == 1, count.calls
        assert original.grad is not None
        original.grad = None


# ---------------------------------------------------------------------------------------------------------------
# Arguments and the other sn_ext tools


def test_argument_errors():
    with pytest.raises(TypeError, match="conv must be a Conv1d/2d/3d or ConvTranspose1d/2d/3d, got Linear"):
        sn_ext.conv_spectral_norm(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"input_shape must be \(channels, size, size\).*got \(3, 8\)"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), (3, 8))
    with pytest.raises(ValueError, match=r"input_shape \(2, 8, 8\) has 2 channels; Conv2d.* takes 3"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), (2, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape \(3, 2, 2\) does not fit Conv2d"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), (3, 2, 2))
    with pytest.raises(ValueError, match=r"input_shape \(3, 3\) does not fit Conv1d.*reflect"):  # padding >= size
        sn_ext.conv_spectral_norm(nn.Conv1d(3, 4, 3, padding=3, padding_mode="reflect"), (3, 3))
    for coeff in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="coeff must be a positive finite number or None"):
            sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), coeff=coeff)
    with pytest.raises(ValueError, match="n_power_iterations must be a positive int"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), n_power_iterations=0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), eps=-1.0)
    with pytest.raises(RuntimeError, match="already has a legacy spectral norm"):
        sn_ext.conv_spectral_norm(torch.nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)))
    with pytest.warns(UserWarning, match="already has a spectral norm"):
        sn_ext.conv_spectral_norm(sn_ext.spectral_norm(nn.Conv2d(3, 4, 3)), (3, 5, 5))
    with pytest.warns(UserWarning, match="already has a spectral norm"):
        sn_ext.spectral_norm(sn_ext.conv_spectral_norm(nn.Conv2d(3, 4, 3), (3, 5, 5)))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = sn_ext.conv_spectral_norm(nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"), (2, 7, 7), 0.8)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 2, 7, 7)
    try:
        for step in range(3):
            if step == 2:
                eager.eval(), compiled_layer.eval()
            out_e, out_c = eager(x), compiled(x)
            assert_rel(out_c, out_e, 1e-6, f"output, step {step}")
            for out in (out_e, out_c):
                out.square().sum().backward()
            assert_rel(_norm(compiled_layer)._u, _norm(eager)._u, 1e-6, "u")
            original = [layer.parametrizations.weight.original.grad for layer in (compiled_layer, eager)]
            assert_rel(*original, 1e-5, "weight gradient")
        # another input size: the error (wrapped by dynamo under fullgraph) carries the message, whole (torch 2.14)
        # or as the pieces of its f-string (torch 2.11); torch 2.6's dynamo says only "Observed exception"
        with pytest.raises(RuntimeError) as raised:
            compiled(torch.randn(2, 2, 9, 9))
        if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 11):
            for piece in ("conv_spectral_norm: ", "normalizes by its operator norm on inputs of shape ", "(2, 7, 7)"):
                assert piece in str(raised.value), str(raised.value)
    finally:
        torch._dynamo.reset()


def test_sigmas_and_spectral_report():
    torch.manual_seed(0)
    plain = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    exact = float(torch.linalg.svdvals(_operator_matrix(plain, (2, 6, 6)))[0])
    net = nn.Sequential(
        sn_ext.conv_spectral_norm(copy.deepcopy(plain), (2, 6, 6), n_power_iterations=500),
        nn.ReLU(),
        sn_ext.conv_spectral_norm(nn.Conv2d(3, 2, 3, padding=1).double(), coeff=0.5),  # not built yet
    )
    assert list(sn_ext.sigmas(net)) == ["0.weight"]
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    state = copy.deepcopy(net.state_dict())
    report = sn_ext.spectral_report(net, x, tol=1e-10, max_iters=20_000)
    assert not _norm(net[2]).built and net.state_dict().keys() == state.keys()  # the report changed nothing
    first, second = report.rows
    assert first["converged"] and first["sigma_exact"] == pytest.approx(exact, rel=1e-8)
    assert first["sigma"] == pytest.approx(exact, rel=1e-5)
    assert first["operator_norm"] == pytest.approx(first["sigma_exact"] / first["sigma"])
    assert second["sigma"] is None and second["operator_norm"] is None and second["sigma_exact"] > 0
    assert report.lipschitz_bound is None
    net(x)
    _, second = sn_ext.spectral_report(net, x, tol=1e-10, max_iters=20_000).rows
    assert second["operator_norm"] == pytest.approx(second["sigma_exact"] / max(1, second["sigma"] / 0.5))


def test_renormalize_grouped_and_restore():
    torch.manual_seed(0)
    net = nn.Sequential(
        sn_ext.conv_spectral_norm(nn.Conv2d(2, 3, 3).double(), (2, 6, 6)), sn_ext.spectral_norm(nn.Conv2d(3, 2, 3))
    )
    norm = _norm(net[0])
    with torch.no_grad():
        norm._u.mul_(0.5)  # an averaged, shortened vector
    sn_ext.renormalize_buffers_(net)
    assert float(torch.linalg.vector_norm(norm._u)) == pytest.approx(1.0, rel=1e-12)
    v = norm._v.clone()
    sn_ext.renormalize_buffers_(net, n_power_iterations=1)  # one round through the convolution
    plain = nn.Conv2d(2, 3, 3).double()
    with torch.no_grad():
        plain.weight.copy_(net[0].parametrizations.weight.original)
    matrix = _operator_matrix(plain, (2, 6, 6))
    assert_rel(norm._v.flatten(), _unit(matrix.T @ _unit(matrix @ v.flatten())), 1e-12, "v after one round")
    sn_ext.grouped_spectral_norm(net)  # the conv_spectral_norm layer keeps its own, per layer
    assert [layer for layer, _ in net._sn_ext_group.layers] == [net[1]]
    sn_ext.ungroup_spectral_norm(net)
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\), tensor 'weight': sn_ext.conv_spectral_norm has no torch"):
        sn_ext.restore_torch_spectral_norm(net)
    assert isinstance(net[1].parametrizations.weight[0], sn_ext.SpectralNorm)  # nothing changed
