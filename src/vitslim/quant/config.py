"""Quantization configs: plain data (dataclasses) with YAML/JSON round-trip, and presets.

A config names, for each activation site of a ViT block, the bit width and quantizer:

* ``post_ln``   — inputs of qkv and fc1 (after LayerNorm: a few channels with huge ranges);
* ``linear``    — input of the attention output projection;
* ``qk``        — q and k, the inputs of q·kᵀ;
* ``softmax``   — the attention probabilities (power-law: log quantizers fit them);
* ``v``         — v, the other input of attn·v;
* ``post_gelu`` — input of fc2 (asymmetric, long positive tail);

and the weights (``weight``). Patch embedding and head stay in FP32, the convention of
RepQ-ViT/I&S-ViT/AdaLog (``quantize_head`` quantizes the head too).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from vitslim.datafile import check_fields, check_mapping, read_data_file
from vitslim.errors import ConfigError

VALID_BITS = (2, 3, 4, 5, 6, 8, 16)
ACT_QUANTIZERS = ("uniform", "log2", "sulq", "adalog", "float")  # float: the site is left unquantized
CALIBRATION = ("minmax", "percentile", "mse")
WEIGHT_METHODS = ("rtn", "gptq")
ROTATIONS = ("hadamard", "hadamard-online", "random")  # vitslim.quant.rotate
SITES = ("post_ln", "linear", "qk", "softmax", "v", "post_gelu")
TOKEN_SITES = ("post_ln", "linear", "qk", "post_gelu")  # may take ranges per token: no matmul sums over tokens
MAX_RECONSTRUCTION_ITERS = 100_000  # papers use up to 20k per block; more is a typo, not a plan


@dataclass(frozen=True)
class SiteConfig:
    """How one activation site is quantized."""

    bits: int = 8
    quantizer: str = "uniform"  # uniform | log2 | sulq | adalog | float (not quantized)
    calibration: str = "minmax"  # uniform only: minmax | percentile | mse
    symmetric: bool = False
    per_channel: bool = False
    # Uniform, per tensor, min-max only: up to this many outlier input channels (calibration
    # magnitude > 1.5x the largest kept one) add their out-of-range part in float beside the
    # integer matmul (LLM.int8()-style decomposition).
    float_channels: int = 0
    # Uniform only: a range per token computed at run time (``TokenQuantizer``; QuaRot's 4-bit
    # activations), its clipping ratio chosen by ``calibration`` (mse: searched, minmax: none).
    per_token: bool = False


# Fields added after configs were first saved, with the default a missing one takes.
ADDED_FIELDS = {"calib_images": None, "gptq_act_order": False, "reconstruction_bias": False}
SITE_ADDED_FIELDS = {"per_token": False}


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model post-training quantization config."""

    weight_bits: int = 8
    weight_calibration: str = "mse"  # minmax | mse (per-output-channel, symmetric)
    weight_method: str = "rtn"  # rtn (round to nearest) | gptq
    gptq_group_size: int | None = None  # GPTQ: a scale per group of input columns (None: per channel)
    gptq_act_order: bool = False  # GPTQ: round the most active input columns first
    post_ln: SiteConfig = field(default_factory=SiteConfig)
    linear: SiteConfig = field(default_factory=SiteConfig)
    qk: SiteConfig = field(default_factory=SiteConfig)
    softmax: SiteConfig = field(default_factory=SiteConfig)
    v: SiteConfig = field(default_factory=SiteConfig)
    post_gelu: SiteConfig = field(default_factory=SiteConfig)
    ln_reparam: bool = False  # RepQ-ViT / I&S-ViT channel-wise → layer-wise for post_ln
    smooth_quant: bool = False  # MPTQ-ViT SmoothQuant with bias on qkv, fc1 and proj inputs
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: searched per layer
    reconstruction_iters: int = 0  # block reconstruction steps per block (0: off)
    reconstruction_bias: bool = False  # reconstruction also learns each quantized linear's bias
    quantize_head: bool = False
    # Mixed precision: W=A bits of each block, overriding weight_bits and the quantized sites'
    # bits there (None: the same bits everywhere). ``vitslim.quant.mixed`` chooses them.
    block_bits: tuple[int, ...] | None = None
    # Calibrate on at most this many of the images given (None: all of them); recipes use it
    # to calibrate one step on fewer images than the others.
    calib_images: int | None = None
    # Orthogonal rotations folded into the weights before calibration (QuaRot/SpinQuant,
    # ``vitslim.quant.rotate``): hadamard | hadamard-online | random | None (off).
    rotation: str | None = None
    rotation_seed: int = 0

    def __post_init__(self) -> None:
        if self.block_bits is not None:  # lists from JSON/YAML become a tuple: configs stay immutable
            object.__setattr__(self, "block_bits", tuple(self.block_bits))
        validate(self)

    def for_block(self, index: int) -> QuantConfig:
        """The config block ``index`` is quantized with: its mixed-precision bits if any."""
        if self.block_bits is None:
            return self
        if index >= len(self.block_bits):
            raise ConfigError(f"block_bits has {len(self.block_bits)} entries but the model has a block {index}; "
                              "give one bit width per block")
        bits = self.block_bits[index]
        sites = {site: replace(getattr(self, site), bits=bits) for site in SITES}
        return replace(self, weight_bits=bits, block_bits=None, **sites)

    def to_dict(self) -> dict:
        data = asdict(self)
        for name, default in ADDED_FIELDS.items():  # configs saved before a field existed stay byte-identical
            if data[name] == default:
                del data[name]
        for site in SITES:
            for name, default in SITE_ADDED_FIELDS.items():
                if data[site][name] == default:
                    del data[site][name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        """A config from plain data (YAML/JSON): names, types and values checked."""
        check_mapping(data, "quantization config")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown quantization option(s) {unknown[:10]}; valid options are {sorted(names)}")
        site_names = {f.name for f in fields(SiteConfig)}
        kwargs = check_fields(cls, data, "", nested=dict.fromkeys(SITES, SiteConfig))
        for site in SITES:
            if site in kwargs:
                bad = sorted(set(check_mapping(kwargs[site], f"site {site!r}")) - site_names)
                if bad:
                    raise ConfigError(f"site {site!r}: unknown option(s) {bad[:10]}; valid are {sorted(site_names)}")
                kwargs[site] = SiteConfig(**check_fields(SiteConfig, kwargs[site], f"{site}."))
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        from vitslim.output import write_text_atomic

        data = self.to_dict()
        write_text_atomic(path, json.dumps(data, indent=2) if str(path).endswith(".json")
                          else yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        """A config from a YAML or JSON (by suffix) file; errors name the file."""
        data = read_data_file(path, "quantization config file")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"quantization config file {str(path)!r}: {err}") from None


def validate(config: QuantConfig) -> None:
    """Unsupported bit widths, quantizer or method names: an error listing the valid ones."""
    if config.weight_bits not in VALID_BITS:
        raise ConfigError(f"weight_bits={config.weight_bits} is not supported; valid bit widths are {VALID_BITS}")
    if config.weight_method not in WEIGHT_METHODS:
        raise ConfigError(f"weight_method={config.weight_method!r} is not one of {WEIGHT_METHODS}")
    if config.weight_calibration not in ("minmax", "mse"):
        raise ConfigError(f"weight_calibration={config.weight_calibration!r} is not one of ('minmax', 'mse')")
    if config.gptq_group_size is not None and config.gptq_group_size < 1:
        raise ConfigError("gptq_group_size must be a positive number of input columns or null, "
                          f"got {config.gptq_group_size}")
    if config.ln_reparam and config.smooth_quant:
        raise ConfigError("ln_reparam and smooth_quant both rescale the post-LayerNorm channels; choose one")
    if config.smooth_alpha is not None and not 0 <= config.smooth_alpha <= 1:
        raise ConfigError(f"smooth_alpha must be in [0, 1] (or null to search it), got {config.smooth_alpha}")
    if config.rotation is not None:
        if config.rotation not in ROTATIONS:
            raise ConfigError(f"rotation={config.rotation!r} is not one of {ROTATIONS} (or null for none)")
        if config.ln_reparam or config.smooth_quant:
            raise ConfigError("rotation turns LayerNorm into RMSNorm (its scale folded into the weights): "
                              "it cannot be combined with ln_reparam or smooth_quant")
        if config.rotation == "hadamard-online" and config.post_gelu.quantizer not in ("uniform", "float"):
            raise ConfigError("rotation='hadamard-online' makes fc2's input signed: post_gelu needs the "
                              f"uniform quantizer, not {config.post_gelu.quantizer!r}")
    bad_block_bits = [b for b in config.block_bits or () if b not in VALID_BITS]
    if bad_block_bits:
        raise ConfigError(f"block_bits {bad_block_bits} not supported; valid bit widths are {VALID_BITS}")
    if config.calib_images is not None and (isinstance(config.calib_images, bool) or
                                            not isinstance(config.calib_images, int) or config.calib_images < 1):
        raise ConfigError(f"calib_images must be >= 1 (or null: all), got {config.calib_images!r}")
    if not 0 <= config.reconstruction_iters <= MAX_RECONSTRUCTION_ITERS:
        raise ConfigError(f"reconstruction_iters must be in [0, {MAX_RECONSTRUCTION_ITERS}], "
                          f"got {config.reconstruction_iters}")
    for site in SITES:
        s = getattr(config, site)
        if s.bits not in VALID_BITS:
            raise ConfigError(f"{site}.bits={s.bits} is not supported; valid bit widths are {VALID_BITS}")
        if s.quantizer not in ACT_QUANTIZERS:
            raise ConfigError(f"{site}.quantizer={s.quantizer!r} is not one of {ACT_QUANTIZERS}")
        if s.calibration not in CALIBRATION:
            raise ConfigError(f"{site}.calibration={s.calibration!r} is not one of {CALIBRATION}")
        if s.float_channels < 0:
            raise ConfigError(f"{site}.float_channels must be >= 0, got {s.float_channels}")
        if s.float_channels and (site not in ("post_ln", "linear", "post_gelu") or s.quantizer != "uniform"
                                 or s.per_channel or s.calibration != "minmax"):
            raise ConfigError(f"{site}.float_channels needs a linear layer's input (post_ln, linear or post_gelu) "
                              "with a per-tensor uniform min-max quantizer")
        if s.per_token and (site not in TOKEN_SITES or s.quantizer != "uniform"
                            or s.symmetric or s.per_channel or s.float_channels or s.calibration == "percentile"):
            raise ConfigError(f"{site}.per_token needs an asymmetric uniform quantizer (calibration mse or minmax, "
                              "no per_channel or float_channels) at post_ln, linear, post_gelu or qk (v and "
                              "softmax are summed over tokens)")
        if s.quantizer not in ("uniform", "float") and site not in ("softmax", "post_gelu"):
            raise ConfigError(f"{site}: log-domain quantizers ({s.quantizer}) need non-negative inputs; "
                              "use them for 'softmax' or 'post_gelu' only")


def uniform_config(w_bits: int, a_bits: int, **overrides) -> QuantConfig:
    """Plain min–max uniform quantization everywhere (the baseline generic tools use)."""
    site = SiteConfig(bits=a_bits)
    return QuantConfig(weight_bits=w_bits, weight_calibration="minmax", post_ln=site, linear=site, qk=site,
                       softmax=site, v=site, post_gelu=site, **overrides)


def vit_config(w_bits: int, a_bits: int, softmax: str = "adalog", gelu: str = "adalog",
               ln_reparam: bool = True, weight_method: str = "rtn", reconstruction_iters: int = 0) -> QuantConfig:
    """The ViT-aware recipe: MSE-searched ranges, LayerNorm reparameterization, a log-domain
    softmax quantizer, optional GPTQ weights and block reconstruction."""
    site = SiteConfig(bits=a_bits, calibration="mse")
    return QuantConfig(
        weight_bits=w_bits, weight_calibration="mse", weight_method=weight_method,
        post_ln=replace(site, per_channel=ln_reparam), linear=site, qk=site, v=site,
        softmax=SiteConfig(bits=a_bits, quantizer=softmax),
        post_gelu=SiteConfig(bits=a_bits, quantizer=gelu, calibration="mse"),
        ln_reparam=ln_reparam, reconstruction_iters=reconstruction_iters)


def rotated_config(w_bits: int, a_bits: int, softmax: str = "adalog", gelu: str = "adalog",
                   weight_method: str = "gptq", gptq_group_size: int | None = None,
                   rotation: str = "hadamard", act_order: bool = False) -> QuantConfig:
    """The low-bit recipe: Hadamard rotations folded into the weights (QuaRot 2024; they take
    the place of LN reparameterization), per-tensor MSE ranges, log-domain softmax/GELU, GPTQ."""
    return replace(vit_config(w_bits, a_bits, softmax=softmax, gelu=gelu, ln_reparam=False,
                              weight_method=weight_method),
                   rotation=rotation, gptq_group_size=gptq_group_size, gptq_act_order=act_order)


def minmax_ranges(config: QuantConfig, sites: tuple[str, ...] = ("post_ln", "linear", "qk")) -> QuantConfig:
    """``config`` with min-max ranges at ``sites``. At 8 bits MSE-searched ranges fit the
    calibration images and clip other images' large values; min-max ranges do not."""
    return replace(config, **{s: replace(getattr(config, s), calibration="minmax") for s in sites})


def per_token_ranges(config: QuantConfig, sites: tuple[str, ...] = TOKEN_SITES) -> QuantConfig:
    """``config`` with a range per token, computed at run time, at ``sites`` (QuaRot's
    activations): the few high-norm tokens of DINOv2 no longer set every token's step."""
    return replace(config, **{s: replace(getattr(config, s), per_token=True) for s in sites})


def _w8a8_ort() -> QuantConfig:
    """Every linear layer and q·kᵀ on int8 kernels; softmax and attn·v float (8-bit uniform
    cannot hold power-law attention probabilities; attn·v is ~5% of the MACs); GPTQ weights;
    post-GELU outlier channels beyond the grid added in float (LLM.int8(), Dettmers et al. 2022).
    The qkv, fc1 and proj inputs are smoothed (SmoothQuant with bias, α 0.5, folded into the
    LayerNorms and v: SmoothQuant, Xiao et al. 2023; MPTQ-ViT, 2024)."""
    base = minmax_ranges(vit_config(8, 8, softmax="float", gelu="uniform", weight_method="gptq", ln_reparam=False),
                         ("post_ln", "linear", "qk", "post_gelu"))
    return replace(base, v=SiteConfig(8, "float"), post_gelu=SiteConfig(8, float_channels=4), smooth_quant=True,
                   smooth_alpha=0.5)


def _w4_ort() -> QuantConfig:
    """4-bit GPTQ weights with a scale per 64 input rows (MatMulNBits' block), act-order and
    searched group ranges, activations left in float (GPTQ, Frantar et al. 2022). Groups of 64
    rather than 32 keep the file over 6x smaller than FP32."""
    float_site = SiteConfig(8, "float")
    return replace(vit_config(4, 8, weight_method="gptq", ln_reparam=False), gptq_group_size=64,
                   gptq_act_order=True, **dict.fromkeys(SITES, float_site))


# W8A8 simulated: SULQ for post-Softmax and post-GELU (I&S-ViT, 2023), min-max ranges elsewhere,
# GPTQ weights, SmoothQuant with bias at α 0.5 on the qkv, fc1 and proj inputs, and ranges per
# token at the linear inputs, q and k (QuaRot, 2024).
_LOG_GELU_TOKEN_SITES = ("post_ln", "linear", "qk")  # post-GELU keeps its log-domain quantizer
_W8A8 = per_token_ranges(replace(minmax_ranges(vit_config(8, 8, softmax="sulq", gelu="sulq", weight_method="gptq",
                                                          ln_reparam=False)), smooth_quant=True, smooth_alpha=0.5),
                         _LOG_GELU_TOKEN_SITES)


def _w8a8_dyn() -> QuantConfig:
    """W8A8 with a range per row of every linear layer's input, computed at run time (the
    simulated ``w8a8``'s activations, QuaRot-style), on an integer kernel: exported, each linear
    is ONNX Runtime's ``MatMulNBits`` with 8-bit weights and int8 compute, which quantizes every
    row's blocks of 32 inputs on their own range. GPTQ weights and SmoothQuant with bias at α 0.5
    as ``w8a8``; q·kᵀ on static int8 ranges as ``w8a8-ort``; softmax and attn·v in float."""
    token = SiteConfig(8, per_token=True)
    return replace(_W8A8, post_ln=token, linear=token, post_gelu=token, qk=SiteConfig(8),
                   softmax=SiteConfig(8, "float"), v=SiteConfig(8, "float"))


def _w4a8_ort() -> QuantConfig:
    """4-bit GPTQ weights (act-order, a searched scale per 64 input columns: ``MatMulNBits``'
    block) with int8 activations on the kernel: ``MatMulNBits`` with int8 compute quantizes
    each row's blocks of the input at run time, simulated by a range per row at the linear
    inputs; q·kᵀ on static int8 ranges, softmax and attn·v in float; then 10 steps of block
    reconstruction per block (as ``w4a8``)."""
    return replace(_w8a8_dyn(), smooth_quant=False, smooth_alpha=None, weight_bits=4, gptq_group_size=64,
                   gptq_act_order=True, reconstruction_iters=10)


def _w4a8() -> QuantConfig:
    """W8A8's activations without channel folds (LN reparameterization's folded channel scales
    made the weights harder to round), 4-bit GPTQ weights with act-order and a searched scale per 32
    input columns (at 8-bit activations groups do better than rotations), ranges per token at the
    linear inputs, q and k, then 10 steps of block reconstruction per block (BRECQ, Li et al. 2021)."""
    return replace(_W8A8, smooth_quant=False, smooth_alpha=None, post_ln=SiteConfig(8, per_token=True), weight_bits=4,
                   gptq_group_size=32, gptq_act_order=True, reconstruction_iters=10)


def _reconstructed_low_bits(bits: int) -> QuantConfig:
    """WnAn with rotations and an online Hadamard before fc2 (uniform post-GELU), a range per
    token for the linear layers' inputs, q and k, GPTQ weights with act-order and a scale per 32
    input columns, then 40 steps of block reconstruction per block (QuaRot, Ashkboos et al. 2024;
    I&S-ViT, Zhong et al. 2023; QDrop, Wei et al. 2022)."""
    return replace(per_token_ranges(rotated_config(bits, bits, gelu="uniform", gptq_group_size=32,
                                                   rotation="hadamard-online", act_order=True)),
                   reconstruction_iters=40)


PRESETS: dict[str, QuantConfig] = {
    # Bit-width presets, each the most faithful config at its width on held-out images.
    "w8a8": _W8A8,
    # Deployable int8 (what export and compress use): ONNX Runtime fuses every quantized matmul.
    "w8a8-ort": _w8a8_ort(),
    # The same with softmax and v on the int8 grid too: every matmul integer (I-ViT's setting).
    "w8a8-int": replace(_w8a8_ort(), softmax=SiteConfig(8), v=SiteConfig(8)),
    # Deployable W8A8 with activation ranges per row at run time (dynamic int8 in ONNX Runtime).
    "w8a8-dyn": _w8a8_dyn(),
    # Low activation bits: Hadamard rotations (QuaRot, 2024) + GPTQ with act-order and a weight
    # scale per 64 input columns, ranges per token at the linear inputs, q and k.
    "w6a6": per_token_ranges(rotated_config(6, 6, softmax="sulq", gelu="sulq", gptq_group_size=64, act_order=True),
                             _LOG_GELU_TOKEN_SITES),
    "w4a8": _w4a8(),
    # W4A4: rotations, an online Hadamard before fc2, then block reconstruction, 40 steps per block.
    "w4a4": _reconstructed_low_bits(4),
    # Deployable 4-bit: GPTQ weights only, exported as ONNX Runtime's MatMulNBits (packed codes
    # and block scales; the kernel quantizes activations to int8 per block itself).
    "w4-ort": _w4_ort(),
    # Deployable W4A8: 4-bit weights, activations int8 per row at run time inside MatMulNBits.
    "w4a8-ort": _w4a8_ort(),
    # The W4A4 recipe at 3 bits.
    "w3a3": _reconstructed_low_bits(3),
    # Method recipes (the papers' settings, for comparison).
    "minmax-w8a8": uniform_config(8, 8),
    "minmax-w4a4": uniform_config(4, 4),
    "repq-w4a4": vit_config(4, 4, softmax="log2", gelu="uniform"),
    "isvit-w4a4": vit_config(4, 4, softmax="sulq", gelu="sulq", reconstruction_iters=100),
    "mptq-w4a4": replace(vit_config(4, 4, weight_method="gptq", ln_reparam=False), smooth_quant=True),
}


def describe(config: QuantConfig) -> str:
    """A one-line recipe of ``config``, e.g. for ``vitslim quantize --help``."""
    def site(name: str) -> str:
        s = getattr(config, name)
        if s.quantizer == "float":
            return f"{name} float"
        what = f"{s.quantizer}{' per-token' * s.per_token} {s.calibration}" if s.quantizer == "uniform" \
            else s.quantizer
        return f"{name} {s.bits}-bit {what}" + (f" +{s.float_channels} outlier ch." if s.float_channels else "")

    alpha = f" α {config.smooth_alpha}" if config.smooth_alpha is not None else " α searched"
    folds = ["LN reparam"] * config.ln_reparam + [f"SmoothQuant-bias{alpha}"] * config.smooth_quant
    rotation = [f"{config.rotation} rotation (seed {config.rotation_seed})"] * bool(config.rotation)
    biases = " + biases" if config.reconstruction_bias else ""
    recon = [f"reconstruction {config.reconstruction_iters} it/block{biases}"] * bool(config.reconstruction_iters)
    group = f" g{config.gptq_group_size}" if config.gptq_group_size and config.weight_method == "gptq" else ""
    order = " act-order" if config.gptq_act_order and config.weight_method == "gptq" else ""
    weights = f"W{config.weight_bits} {config.weight_method}{group}{order}"
    return "; ".join([weights, *rotation, *map(site, SITES), *folds, *recon])


LINEAR_SITES = ("post_ln", "linear", "post_gelu")  # the inputs of qkv/fc1, proj and fc2
# The paper each quantizer that no integer kernel runs reproduces (named when a config is simulated).
SIMULATED_QUANTIZERS = {"log2": "log2 (FQ-ViT 2022)", "sulq": "SULQ (I&S-ViT 2023)", "adalog": "AdaLog (ECCV 2024)"}


def simulated_parts(config: QuantConfig) -> list[str]:
    """What of ``config`` an exported graph can only compute as float arithmetic (no integer
    kernel in ONNX Runtime runs it), one phrase each; empty when the model deploys: 8-bit
    weights with 8-bit uniform inputs (static ranges, or a range per token at the linear
    layers' inputs: dynamic int8), or 4-bit weights with float inputs or a range per token
    (``MatMulNBits`` with int8 compute quantizes its input at run time)."""
    parts: dict[str, None] = {}
    for block in range(len(config.block_bits)) if config.block_bits else [None]:
        for part in _simulated_in_block(config if block is None else config.for_block(block)):
            parts[part] = None
    return list(parts)


def _simulated_in_block(config: QuantConfig) -> list[str]:
    weights = config.weight_bits
    reasons: dict[str, list[str]] = {}  # reason -> the sites it applies to
    for name in SITES:
        site = getattr(config, name)
        if site.quantizer in SIMULATED_QUANTIZERS:
            reason = SIMULATED_QUANTIZERS[site.quantizer]
        elif site.quantizer == "float":
            continue
        elif site.bits != 8:
            reason = f"{site.bits}-bit activations"
        elif site.per_channel and not (name == "post_ln" and (config.ln_reparam or config.smooth_quant)):
            reason = "per-channel activation ranges"
        elif site.per_token and (name not in LINEAR_SITES or weights not in (4, 8)):
            reason = "per-token ranges (QuaRot 2024)"
        else:
            continue
        reasons.setdefault(reason, []).append(name)
    parts = [f"{weights}-bit weights"] if weights not in (4, 8) else []
    return parts + [f"{reason} at {'/'.join(names)}" for reason, names in reasons.items()]


def deployment(config: QuantConfig) -> str:
    """How a model quantized with ``config`` runs once exported: ``deployable: <kernels>`` or
    ``simulation: <what is computed in float>``."""
    parts = simulated_parts(config)
    if parts:
        return "simulation: " + ", ".join(parts) + " in float arithmetic"
    weights = {config.weight_bits, *(config.block_bits or ())}
    dynamic = any(getattr(config, s).per_token for s in LINEAR_SITES)
    kernels = []
    if 8 in weights:
        kernels.append("8-bit MatMulNBits with int8 compute (activations quantized per row and block of 32 "
                       "at run time)" if dynamic else "int8 MatMulIntegerToFloat")
    if 4 in weights:
        kernels.append("4-bit MatMulNBits (int8 activations inside the kernel)")
    return "deployable: ONNX Runtime " + " + ".join(kernels)


def deployable_presets() -> list[str]:
    """The presets whose models run on integer kernels once exported."""
    return [name for name, config in PRESETS.items() if not simulated_parts(config)]


def preset(name: str) -> QuantConfig:
    """A named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown quantization preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]
