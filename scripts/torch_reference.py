#!/usr/bin/env python3
"""PyTorch reference of the cmseg model and loss, written from /work/shared/SPEC.md.

Three jobs:
  run      the parity oracle for the native engine: reads a case file (weights, images,
           labels), writes probabilities, confusion matrices, loss terms, every gradient
           and, optionally, the parameters after a few Adam/AdamW steps.
  bench    the benchmark peer for the SPEC section 8 configurations: times full training
           steps (forward, loss, backward, Adam), or for the *-predict configurations one
           forward pass without gradients (p and each q_r), and prints one JSON line.
  predict  a cmseg checkpoint (cmseg train's or saveCheckpoint's) in PyTorch: its model on
           images from a .safetensors file, probabilities, CMs and q_r written to another;
           each image whole, or with --patch by Gaussian-weighted sliding windows (SPEC 5,
           as cmseg's slidingWindowPredict documents them; --overlap, default 0.5; --mirror).
From Python, load_checkpoint(path) gives a cmseg checkpoint as this file's CMUNet, and
sliding_window_predict(model, volume [C, *S], patch, overlap) predicts a whole volume.

Nothing here reads the C++ code; where this file and the SPEC disagree, the SPEC wins.

Examples:
  python3 scripts/torch_reference.py run --case case.safetensors --out result.safetensors --dtype float64
  python3 scripts/torch_reference.py bench --config mnist2d --steps 5 --warmup 1 --threads 2
  python3 scripts/torch_reference.py predict --checkpoint runs/cm/best.safetensors --images x.safetensors --out p.safetensors
  python3 scripts/torch_reference.py predict --checkpoint best.safetensors --images x.safetensors --out p.safetensors --patch 64 --overlap 0.5
"""

import argparse
import json
import re
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

UNLABELLED = 255  # SPEC 1: label value of an unlabelled pixel
NORM_EPS = 1e-5  # SPEC 2: InstanceNorm epsilon
PROB_FLOOR = 1e-12  # SPEC 4: q is clamped before the log

CONFIG_DEFAULTS = {
    "depth": 4,
    # baseChannels: 32 in 2D, 16 in 3D, as cmseg's own default (parse_config fills it)
    "cmMode": "full",
    "cmRank": 1,
    "cmHeadBlocks": 0,
}
CONFIG_REQUIRED = ("ndim", "inChannels", "classes", "annotators")
CM_MODES = ("full", "lowrank", "global")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def parse_config(raw):
    """Fills SPEC defaults and rejects values the network cannot be built from.

    Keys the reference does not use (e.g. cmInit) are ignored, so the TypeScript side
    may pass its whole model config.
    """
    cfg = dict(CONFIG_DEFAULTS)
    cfg.update(raw)
    for key in CONFIG_REQUIRED:
        if key not in raw:
            raise ValueError(f"config is missing '{key}'")
    if cfg["ndim"] not in (2, 3):
        raise ValueError(f"config.ndim {cfg['ndim']} must be 2 or 3")
    cfg.setdefault("baseChannels", 32 if cfg["ndim"] == 2 else 16)
    if cfg["cmMode"] not in CM_MODES:
        raise ValueError(f"config.cmMode '{cfg['cmMode']}' must be one of {CM_MODES}")
    for key in ("inChannels", "classes", "annotators", "depth", "baseChannels", "cmRank"):
        if int(cfg[key]) < 1:
            raise ValueError(f"config.{key} {cfg[key]} must be >= 1")
    if int(cfg["cmHeadBlocks"]) < 0:
        raise ValueError(f"config.cmHeadBlocks {cfg['cmHeadBlocks']} must be >= 0")
    return cfg


def cm_head_channels(cfg):
    """SPEC 3: L*L raw entries (full) or 2*L*l + 1 (lowrank: U, W and the diagonal s)."""
    L = cfg["classes"]
    if cfg["cmMode"] == "full":
        return L * L
    return 2 * L * cfg["cmRank"] + 1


# ---------------------------------------------------------------------------
# Network (SPEC 2)
# ---------------------------------------------------------------------------

def conv_layers(ndim):
    if ndim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d


class Block(nn.Module):
    """conv3 -> IN -> ReLU -> conv3 -> IN -> ReLU; convs have no bias since IN follows."""

    def __init__(self, ndim, in_channels, out_channels):
        super().__init__()
        Conv, _, Norm = conv_layers(ndim)
        self.conv1 = Conv(in_channels, out_channels, 3, padding=1, bias=False)
        # No running statistics: SPEC 2 normalises identically in training and inference.
        self.norm1 = Norm(out_channels, eps=NORM_EPS, affine=True, track_running_stats=False)
        self.conv2 = Conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = Norm(out_channels, eps=NORM_EPS, affine=True, track_running_stats=False)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class CMUNet(nn.Module):
    """Shared U-Net trunk with a consensus head and one CM head per annotator.

    Attribute names are chosen so that state_dict keys are exactly the SPEC 2 names
    (enc.k.conv1.weight, up.k.bias, seg.weight, cm.r.bias, gcm.r, cmblock.r.b...).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ndim, depth, c = cfg["ndim"], cfg["depth"], cfg["baseChannels"]
        L, R = cfg["classes"], cfg["annotators"]
        Conv, ConvT, _ = conv_layers(ndim)
        width = [c * 2 ** k for k in range(depth)]

        self.enc = nn.ModuleList(
            Block(ndim, cfg["inChannels"] if k == 0 else width[k - 1], width[k])
            for k in range(depth))
        # Decoder step k goes from level depth-1-k up to level depth-2-k.
        self.up = nn.ModuleList(
            ConvT(width[depth - 1 - k], width[depth - 2 - k], 2, stride=2, bias=True)
            for k in range(depth - 1))
        self.dec = nn.ModuleList(
            Block(ndim, 2 * width[depth - 2 - k], width[depth - 2 - k])
            for k in range(depth - 1))
        self.seg = Conv(c, L, 1, bias=True)

        blocks = int(cfg["cmHeadBlocks"])
        if blocks > 0 and cfg["cmMode"] != "global":
            self.cmblock = nn.ModuleList(
                nn.ModuleList(Block(ndim, c, c) for _ in range(blocks)) for _ in range(R))
        else:
            self.cmblock = None
        if cfg["cmMode"] == "global":
            self.cm = None
            self.gcm = nn.ParameterList(nn.Parameter(torch.zeros(L, L)) for _ in range(R))
        else:
            self.cm = nn.ModuleList(Conv(c, cm_head_channels(cfg), 1, bias=True) for _ in range(R))
            self.gcm = None

    def features(self, x):
        """Last decoder features (width c); with depth 1 the enc.0 output."""
        skips = []
        for k, block in enumerate(self.enc):
            if k > 0:
                x = F.max_pool2d(x, 2, 2) if self.cfg["ndim"] == 2 else F.max_pool3d(x, 2, 2)
            x = block(x)
            skips.append(x)
        depth = len(self.enc)
        for k in range(depth - 1):
            x = torch.cat([skips[depth - 2 - k], self.up[k](x)], dim=1)
            x = self.dec[k](x)
        return x

    def forward(self, images):
        """Returns (seg logits [N,L,*S], list of R confusion matrices).

        Each CM is [N,L,L,*S] in pixel-wise modes and [1,L,L,1..1] in global mode, so
        that it broadcasts against the probabilities.
        """
        feats = self.features(images)
        logits = self.seg(feats)
        cms = []
        for r in range(self.cfg["annotators"]):
            if self.gcm is not None:
                A = cm_global(self.gcm[r])
                cms.append(A.view(1, *A.shape, *([1] * self.cfg["ndim"])))
                continue
            h = feats
            if self.cmblock is not None:
                for block in self.cmblock[r]:
                    h = block(h)
            cms.append(cm_from_raw(self.cm[r](h), self.cfg))
        return logits, cms


# ---------------------------------------------------------------------------
# Confusion matrices (SPEC 3)
# ---------------------------------------------------------------------------

# The parity oracle computes softplus exactly, as the SPEC and cmseg do; the benchmark
# times the F.softplus a PyTorch user writes (linear above 20, within 2.1e-9 of it there), which is
# quicker than logaddexp: timing the slower form would flatter cmseg's ratio.
EXACT_SOFTPLUS = True


def softplus(x):
    """log(1 + e^x) without F.softplus's linear cut-off above 20; gradient is sigmoid(x)."""
    if not EXACT_SOFTPLUS:
        return F.softplus(x)
    return torch.logaddexp(x, torch.zeros_like(x))


def normalise_columns(a):
    """A[i][j] = a[i][j] / sum_i' a[i'][j]: every column (true class) sums to 1."""
    return a / a.sum(dim=-2 if a.dim() == 2 else 1, keepdim=True)


def cm_global(raw):
    """SPEC 3 global mode: one raw [L,L] matrix per annotator."""
    return normalise_columns(softplus(raw))


def cm_from_raw(raw, cfg):
    """Head output [N, ch, *S] -> A [N, L, L, *S] with A[:, i, j] = p(label i | class j)."""
    L = cfg["classes"]
    if raw.dtype in (torch.float16, torch.bfloat16):
        raw = raw.float()  # under autocast: normalising in bf16 would blur the CMs
    n, spatial = raw.shape[0], raw.shape[2:]
    if cfg["cmMode"] == "full":
        a = softplus(raw.reshape(n, L, L, *spatial))  # channel i*L + j is u[i][j]
        return normalise_columns(a)
    l = cfg["cmRank"]
    U = softplus(raw[:, : L * l].reshape(n, L, l, *spatial))  # U[i][k] = ch[i*l + k]
    W = softplus(raw[:, L * l: 2 * L * l].reshape(n, L, l, *spatial))  # W[j][k] = ch[L*l + j*l + k]
    s = softplus(raw[:, 2 * L * l])  # [N, *S]
    a = (U.unsqueeze(2) * W.unsqueeze(1)).sum(dim=3)  # sum_k sp(U[i][k]) sp(W[j][k])
    eye = torch.eye(L, dtype=raw.dtype, device=raw.device).view(1, L, L, *([1] * len(spatial)))
    a = a + eye * s.unsqueeze(1).unsqueeze(1)
    return normalise_columns(a)


# ---------------------------------------------------------------------------
# Loss (SPEC 4)
# ---------------------------------------------------------------------------

LOSS_DEFAULT_LAMBDA = 0.01  # cmseg's default trace weight (src/model/config.ts LossOptions)


def effective_lambda(loss_cfg, steps_taken):
    """SPEC 4 warm-up: the trace term is negated for the first warmupSteps steps.

    Settings left out take cmseg's defaults: lambda 0.01, lambdaWarmup equal to lambda,
    warmupSteps 0.
    """
    lam = float(loss_cfg.get("lambda", LOSS_DEFAULT_LAMBDA))
    if steps_taken < int(loss_cfg.get("warmupSteps", 0)):
        return -float(loss_cfg.get("lambdaWarmup", lam))
    return lam


def annotator_loss(logits, cms, labels, present, lam):
    """loss = sum_r CE_r + lam * sum_r T_r (paper eqs. 3-4, SPEC 4).

    logits [N,L,*S]; cms: R tensors broadcastable to [N,L,L,*S]; labels [R,N,*S] integer
    with 255 = unlabelled; present [N,R]. Returns (loss, ce [R], trace [R], probs).
    Branch-free (torch.where instead of Python ifs) so it runs without host syncs on
    CUDA and traces under torch.compile.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss is always evaluated in at least float32
    p = torch.softmax(logits, dim=1)
    n, spatial = p.shape[0], p.shape[2:]
    voxels = math.prod(spatial)
    pres = present.to(p.dtype)
    zero = p.new_zeros(())
    ce_terms, trace_terms = [], []
    for r, A in enumerate(cms):
        A = A.to(p.dtype)
        q = (A * p.unsqueeze(1)).sum(dim=2)  # q[i] = sum_j A[i][j] p[j]
        lab = labels[r].long()
        in_image = pres[:, r].view(n, *([1] * len(spatial))) > 0
        valid = (lab != UNLABELLED) & in_image
        q_label = q.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
        nll = -torch.log(torch.clamp_min(q_label, PROB_FLOOR))
        count = valid.sum()
        has_labels = count > 0
        ce = torch.where(has_labels, (nll * valid).sum() / count.clamp_min(1), zero)

        # T_r averages trace(A_r) over every pixel of the images r is present in.
        trace = A.diagonal(dim1=1, dim2=2).sum(dim=-1).expand(n, *spatial)
        trace_sum = (trace.reshape(n, -1).sum(dim=1) * pres[:, r]).sum()
        images = pres[:, r].sum()
        # SPEC 4: an annotator with no labelled pixel contributes 0 to both terms.
        tr = torch.where(has_labels, trace_sum / (images.clamp_min(1) * voxels), zero)
        ce_terms.append(ce)
        trace_terms.append(tr)
    ce = torch.stack(ce_terms)
    trace = torch.stack(trace_terms)
    loss = ce.sum() + lam * trace.sum()
    return loss, ce, trace, p


def plain_cross_entropy(logits, target):
    """Mean -log softmax(logits)[target] over pixels with target != 255 (0 if none)."""
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1)
    lab = target.long()
    valid = lab != UNLABELLED
    picked = logp.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
    count = valid.sum()
    return torch.where(count > 0, -(picked * valid).sum() / count.clamp_min(1), logp.new_zeros(()))


def soft_cross_entropy(logits, target):
    """Mean -sum_k t[k] log softmax(logits)[k] over pixels whose target row has a nonzero
    entry (a row of zeros: nobody labelled the pixel); 0 if none."""
    logp = torch.log_softmax(logits, dim=1)
    t = target.to(logp.dtype)
    labelled = (t != 0).any(dim=1)
    count = labelled.sum()
    return torch.where(count > 0, -(t * logp).sum() / count.clamp_min(1), logp.new_zeros(()))


# ---------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------

def make_optimizer(params, optim_cfg):
    """torch.optim.Adam (weight decay = L2 added to the gradient) or AdamW (decoupled)."""
    kind = optim_cfg.get("kind", "adam")
    kwargs = dict(
        lr=float(optim_cfg.get("lr", 1e-3)),
        betas=(float(optim_cfg.get("beta1", 0.9)), float(optim_cfg.get("beta2", 0.999))),
        eps=float(optim_cfg.get("eps", 1e-8)),
        weight_decay=float(optim_cfg.get("weightDecay", 0.0)),
    )
    if kind == "adam":
        return torch.optim.Adam(params, **kwargs)
    if kind == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"optim.kind '{kind}' must be 'adam' or 'adamw'")


# ---------------------------------------------------------------------------
# Case files (run)
# ---------------------------------------------------------------------------

def exact_float32_on_cuda():
    """The oracle must not use TF32 (on by default for cuDNN convolutions)."""
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    except (AttributeError, RuntimeError):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def validate_inputs(cfg, images, labels, present):
    """SPEC 1: reject bad shapes, out-of-range labels and non-finite images by name."""
    ndim, depth = cfg["ndim"], cfg["depth"]
    L, R = cfg["classes"], cfg["annotators"]
    if images.dim() != 2 + ndim:
        raise ValueError(f"images has shape {list(images.shape)}; expected [N, C, *S] with {ndim} spatial dims")
    n, c, spatial = images.shape[0], images.shape[1], tuple(images.shape[2:])
    if c != cfg["inChannels"]:
        raise ValueError(f"images has {c} channels; config.inChannels is {cfg['inChannels']}")
    stride = 2 ** (depth - 1)
    for axis, size in enumerate(spatial):
        if size % stride:
            raise ValueError(f"images spatial size {size} (axis {axis}) is not divisible by 2^(depth-1) = {stride}")
    if not torch.isfinite(images).all():
        index = int((~torch.isfinite(images)).flatten().nonzero()[0])
        raise ValueError(f"images has a NaN/Inf at flat index {index}")
    if tuple(labels.shape) != (R, n, *spatial):
        raise ValueError(f"labels has shape {list(labels.shape)}; expected {[R, n, *spatial]}")
    bad = (labels.long() >= L) & (labels.long() != UNLABELLED)
    if bad.any():
        index = int(bad.flatten().nonzero()[0])
        raise ValueError(f"labels value {int(labels.flatten()[index])} at flat index {index} >= classes ({L})")
    if tuple(present.shape) != (n, R):
        raise ValueError(f"present has shape {list(present.shape)}; expected {[n, R]}")


def usable_device(device):
    """--device cuda where torch sees no CUDA device is a caller error naming the flag; it was a
    RuntimeError from deep in torch's CUDA start-up, with a traceback, after the inputs were built."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no usable CUDA device "
                         f"(built for CUDA {torch.version.cuda}); use --device cpu")
    return device


def readable(path):
    """Opens `path` once as safetensors, so that a file cut short by a failed copy or one that is
    not safetensors at all is a ValueError naming it. safetensors raised its own SafetensorError
    ("Error while deserializing header: header too large", no file name), which the CLI did not
    take for a caller error: a traceback and exit 1."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable .safetensors file ({err})") from None
    return path


def load_case(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(readable(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path)
    if "config" not in meta:
        raise ValueError(f"{path}: metadata has no 'config'")
    case = {
        "config": parse_config(json.loads(meta["config"])),
        "loss": json.loads(meta.get("loss", "{}")),
        "optim": json.loads(meta.get("optim", "{}")),
        "steps": int(meta.get("steps", "0")),
        "step": int(meta.get("step", "0")),
        "tensors": tensors,
    }
    for name in ("images", "labels"):
        if name not in tensors:
            raise ValueError(f"{path}: tensor '{name}' is missing")
    return case


def load_parameters(model, tensors, source="case"):
    """Copies every SPEC-named parameter from the case; any missing or extra one is an error.
    `source` names the file in the errors (a checkpoint's said "case ...")."""
    expected = dict(model.named_parameters())
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{source} is missing parameters: {missing}")
    reserved = {"images", "labels", "present", "target", "softTarget"}
    extra = [k for k in tensors if k not in expected and k not in reserved]
    if extra:
        raise ValueError(f"{source} has tensors that are not parameters of this config: {extra}")
    with torch.no_grad():
        for name, param in expected.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"parameter {name} has shape {list(value.shape)}; expected {list(param.shape)}")
            param.copy_(value.to(param.dtype))


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """A cmseg checkpoint as the PyTorch reference model: (model, info).

    Any checkpoint cmseg writes (cmseg train, or saveCheckpoint from TypeScript): its
    metadata holds the model config (the same keys parse_config takes), the parameters are
    stored under their SPEC names in PyTorch layout. The model comes in eval mode with the
    checkpoint's weights. info: config, optimizer and loss settings, step, the trainer's
    extra state, and the Adam moments {"m": {name: tensor}, "v": {...}} to resume in PyTorch
    (torch.optim.Adam's exp_avg / exp_avg_sq).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(readable(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "cmseg-checkpoint":
        raise ValueError(f"{path}: not a cmseg checkpoint (metadata format is {meta.get('format')!r})")
    # The checks cmseg's loadCheckpoint makes: a resume from what they refuse would not be exact.
    version = meta.get("version", "1")
    if version != "1":
        raise ValueError(f"{path}: checkpoint format version {version!r}; this reference reads version '1'")
    tensors = load_file(path)
    cfg = parse_config(json.loads(meta["config"]))
    model = CMUNet(cfg)
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    load_parameters(model, weights, source=f"{path}: checkpoint")
    model = model.to(device=device, dtype=dtype).eval()
    moments = {
        "m": {k[len("optim.m."):]: v for k, v in tensors.items() if k.startswith("optim.m.")},
        "v": {k[len("optim.v."):]: v for k, v in tensors.items() if k.startswith("optim.v.")},
    }
    if moments["m"] or moments["v"]:
        for kind in ("m", "v"):
            missing = sorted(set(weights) - set(moments[kind]))
            if missing:
                raise ValueError(f"{path}: Adam moments optim.{kind}.* lack {len(missing)} parameter(s) ({', '.join(missing[:3])}): every moment or none")
        if not re.fullmatch(r"\d+", meta.get("step", "")):
            raise ValueError(f"{path}: Adam moments without a whole-number 'step' (got {meta.get('step')!r}): bias correction needs it")
    info = {
        "config": cfg,
        "optimizer": json.loads(meta.get("optimizer", "{}")),
        "loss": json.loads(meta.get("loss", "{}")),
        "step": int(meta.get("step", "0")),
        "extra": json.loads(meta.get("extra", "{}")),
        "moments": moments,
    }
    return model, info


def predict_probs(model, images):
    """Consensus probabilities p [N, L, *S] and CMs [N, R, L, L, *S] (SPEC 3), as cmseg's predict gives them."""
    with torch.no_grad():
        logits, cms = model(images)
        probs = torch.softmax(logits, dim=1)
        return probs, expand_cms(cms, images.shape[0], tuple(images.shape[2:]))


def command_predict(args):
    from safetensors.torch import load_file, save_file

    model, info = load_checkpoint(args.checkpoint, device=usable_device(args.device))
    images = load_file(readable(args.images))
    if "images" not in images:
        raise ValueError(f"{args.images}: tensor 'images' is missing")
    x = images["images"].to(device=args.device, dtype=torch.float32)
    cfg = info["config"]
    if x.dim() != cfg["ndim"] + 2 or x.shape[1] != cfg["inChannels"]:
        raise ValueError(f"images have shape {list(x.shape)}; the checkpoint's model takes [N, {cfg['inChannels']}, *S] with {cfg['ndim']} spatial axes")
    # N = 0 failed inside torch (instance_norm's IndexError, or torch.stack of no windows).
    if x.shape[0] == 0 or any(size == 0 for size in x.shape[2:]):
        raise ValueError(f"{args.images}: images have shape {list(x.shape)}: no image to predict")
    # SPEC 1: a NaN/Inf in an image is refused, as cmseg's predict refuses it; here it gave NaN
    # maps, written with "ok": true.
    bad = ~torch.isfinite(x)
    if bad.any():
        index = int(bad.flatten().nonzero()[0])
        voxels = math.prod(x.shape[2:])
        kind = "NaN" if math.isnan(float(x.flatten()[index])) else "Inf"
        raise ValueError(f"{args.images}: images contain {kind} at index {index} "
                         f"(image {index // (voxels * x.shape[1])}, channel {index // voxels % x.shape[1]})")
    # Checked here, so that each is a caller error naming the flag (torch said "range() arg 3
    # must not be zero" for --batch 0, and raised a RuntimeError with a traceback for --threads -1).
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads} must be >= 0 (0: torch's choice)")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.patch is None:
        if args.overlap is not None or args.mirror:
            raise ValueError("--overlap and --mirror need --patch (sliding windows); without it each image is predicted whole")
        # A whole image goes through every pooling: a size that does not halve evenly failed
        # deep in torch.cat ("Sizes of tensors must match ...") with a traceback.
        stride = 2 ** (cfg["depth"] - 1)
        for axis, size in enumerate(x.shape[2:]):
            if size % stride:
                raise ValueError(f"images spatial size {size} (axis {axis}) is not divisible by 2^(depth-1) = {stride}: "
                                 f"predict by sliding windows (--patch) or pad the images")
        probs, cms = predict_probs(model, x)
        q = (cms * probs.unsqueeze(1).unsqueeze(2)).sum(dim=3)
        windows = None
    else:
        # SPEC 5: each image [C, *S] by Gaussian-weighted sliding windows of --patch.
        patch = parse_patch(args.patch, cfg["ndim"])
        overlap = 0.5 if args.overlap is None else args.overlap
        results = [sliding_window_predict(model, image, patch, overlap=overlap, batch=args.batch, mirror=args.mirror)
                   for image in x]
        probs, cms, q = (torch.stack([r[k] for r in results]) for k in ("probs", "cms", "annotatorProbs"))
        windows = results[0]["windows"] if results else 0
    out = {"probs": probs, "cms": cms, "annotatorProbs": q}
    save_output({k: v.float().cpu().contiguous() for k, v in out.items()}, args.out)
    report = {"ok": True, "checkpoint": args.checkpoint, "step": info["step"], "out": args.out,
              **{k: list(v.shape) for k, v in out.items()}}
    if windows is not None:
        report["windowsPerImage"] = windows
    print(json.dumps(report))


def save_output(tensors, path, metadata=None):
    """save_file (which writes a temporary file beside `path` and renames it: never half a file),
    with a folder that is missing or not writable an OSError naming `path`: safetensors' own
    SafetensorError gave a traceback and exit 1."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        raise OSError(f"{path}: could not write the output ({err})") from None


def expand_cms(cms, n, spatial):
    """[N,R,L,L,*S]: global CMs are broadcast to every image and pixel."""
    return torch.stack([A.expand(n, A.shape[1], A.shape[2], *spatial) for A in cms], dim=1)


# ---------------------------------------------------------------------------
# Sliding-window inference (SPEC 5), written from SPEC 5, README.md and the documented
# choices at the top of cmseg's src/model/sliding-window.ts (not from its code):
#   - per axis of size S and patch P, with S >= P: the first window starts at 0 and the last
#     ends flush with the far edge; the windows in between are spread evenly, the fewest
#     windows such that consecutive starts are at most P * (1 - overlap) apart (at least 1);
#   - S < P: one window, the volume centred in it (floor((P - S) / 2) zeros in front) and
#     padded with zeros; padded voxels are predicted and discarded;
#   - every window output (p, the CMs A_r, q_r = A_r p) is weighted by a Gaussian importance
#     map: exp(-sum_axis ((x - c) / sigma)^2 / 2) with c = (P - 1) / 2 and sigma = P * 1/8
#     per axis, 1 at the centre, raised to at least 1e-3 (GAUSSIAN_WEIGHT_FLOOR, so that a
#     corner covered by one window's corner has a weight); the result is the weighted mean
#     sum(w * out) / sum(w) of the windows covering each voxel;
#   - mirror (test-time augmentation): each window is also predicted mirrored along every
#     subset of the chosen spatial axes, predictions flipped back and averaged (nnU-Net).
# Sums are float64 unless asked otherwise (the oracle); outputs are float32.
# ---------------------------------------------------------------------------

GAUSSIAN_WEIGHT_FLOOR = 1e-3


def _exact_fraction(x):
    """The number the user wrote: 0.8 is 4/5, not the binary double just above it.

    SPEC 5 speaks of overlap 0.5; a step of P * (1 - overlap) voxels is meant as a decimal
    fraction of the patch (overlap 0.8 of a 40-voxel patch is a step of 8, not 7.999...).
    """
    from fractions import Fraction

    return Fraction(repr(float(x)))


def window_starts(size, patch, overlap=0.5):
    """Start offsets (in the padded axis) of the windows along one axis; see the block comment."""
    from fractions import Fraction

    size, patch = int(size), int(patch)
    if size <= patch:
        return [0]
    max_step = max(1, math.floor(patch * (1 - _exact_fraction(overlap))))
    span = size - patch
    steps = -(-span // max_step)  # ceil: the fewest gaps of at most max_step voxels
    # Evenly spread: start i = round(i * span / steps), halves rounded up (as JavaScript's
    # Math.round, which cmseg documents only as "evenly spread"); exact integer arithmetic.
    return [math.floor(Fraction(i * span, steps) + Fraction(1, 2)) for i in range(steps + 1)]


def importance_map(patch, sigma_scale=1 / 8, floor=GAUSSIAN_WEIGHT_FLOOR, dtype=torch.float64):
    """Gaussian weights of one window [*patch], 1 at the centre, at least `floor` everywhere."""
    grids = torch.meshgrid(*[torch.arange(p, dtype=torch.float64) for p in patch], indexing="ij")
    exponent = torch.zeros(tuple(patch), dtype=torch.float64)
    for g, p in zip(grids, patch):
        exponent = exponent + ((g - (p - 1) / 2) / (p * sigma_scale)) ** 2
    # Scaled to 1 at the centre in the exponent, not by dividing by the maximum: with a tiny
    # sigma (sigma_scale 1e-3 of a 16^3 window) every exp(-exponent / 2) underflows to 0, and
    # 0 / 0 made every weight NaN.
    w = torch.exp(-0.5 * (exponent - exponent.min()))
    return torch.clamp_min(w, floor).to(dtype)


def _subsets(axes):
    out = [[]]
    for a in axes:
        out += [s + [a] for s in out]
    return out


def window_outputs(model, x, mirror_axes=()):
    """p [N,L,*P], A [N,R,L,L,*P], q [N,R,L,*P] of a batch of windows; mirrored and averaged
    over every subset of `mirror_axes` (spatial axes, 0 = first spatial axis)."""
    total = None
    subsets = _subsets(list(mirror_axes))
    for flip in subsets:
        xi = torch.flip(x, [2 + a for a in flip]) if flip else x
        logits, cms = model(xi)
        p = torch.softmax(logits, dim=1)
        A = expand_cms(cms, x.shape[0], tuple(x.shape[2:]))  # [N,R,L,L,*P]
        # q[r][i] = sum_j A[r][i][j] p[j], summed over j in order (half the time of the
        # broadcast product's .sum(dim=3), which builds an [N,R,L,L,*P] temporary).
        q = sum(A[:, :, :, j] * p[:, None, j:j + 1] for j in range(p.shape[1]))
        if flip:
            p = torch.flip(p, [2 + a for a in flip])
            A = torch.flip(A, [4 + a for a in flip])
            q = torch.flip(q, [3 + a for a in flip])
        outs = (p, A, q)
        total = outs if total is None else tuple(t + o for t, o in zip(total, outs))
    return tuple(t / len(subsets) for t in total)


def sliding_window_predict(model, volume, patch, overlap=0.5, batch=2, sigma_scale=1 / 8,
                           mirror=False, sum_dtype=torch.float64):
    """A whole volume [C, *S] predicted by Gaussian-weighted sliding windows.

    patch: a list of len(S) sizes (or one int for every axis). mirror: False, True (every
    spatial axis) or a list of spatial axes. Returns {"probs": [L,*S], "cms": [R,L,L,*S],
    "annotatorProbs": [R,L,*S], "windows": count}, float32 tensors on the volume's device.
    """
    cfg = model.cfg
    ndim = cfg["ndim"]
    if volume.dim() != ndim + 1 or volume.shape[0] != cfg["inChannels"]:
        raise ValueError(f"volume has shape {list(volume.shape)}; the model takes [{cfg['inChannels']}, *S] with {ndim} spatial axes")
    patch = [int(patch)] * ndim if isinstance(patch, int) else [int(p) for p in patch]
    if len(patch) != ndim:
        raise ValueError(f"patch {patch} must have {ndim} sizes")
    multiple = 2 ** (cfg["depth"] - 1)
    for p in patch:
        if p < 1 or p % multiple:
            raise ValueError(f"patch size {p} is not a positive multiple of 2^(depth-1) = {multiple}")
    if not 0 <= float(overlap) < 1:
        raise ValueError(f"overlap {overlap} must be in [0, 1)")
    if int(batch) < 1:
        raise ValueError(f"batch {batch} must be >= 1 window")
    if not torch.isfinite(volume).all():
        raise ValueError("volume has a NaN/Inf")
    if mirror is True:
        mirror_axes = list(range(ndim))
    elif mirror is False or mirror is None:
        mirror_axes = []
    else:
        mirror_axes = [int(a) for a in mirror]

    spatial = list(volume.shape[1:])
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    before = [(q - s) // 2 for q, s in zip(padded, spatial)]
    x = torch.zeros(volume.shape[0], *padded, dtype=volume.dtype, device=volume.device)
    x[(slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, spatial))] = volume
    starts = [window_starts(q, p, overlap) for q, p in zip(padded, patch)]
    grid = [[]]
    for axis_starts in starts:
        grid = [g + [s] for g in grid for s in axis_starts]

    L, R = cfg["classes"], cfg["annotators"]
    dev = volume.device
    w = importance_map(patch, sigma_scale).to(device=dev, dtype=sum_dtype)
    acc_p = torch.zeros(L, *padded, dtype=sum_dtype, device=dev)
    acc_a = torch.zeros(R, L, L, *padded, dtype=sum_dtype, device=dev)
    acc_q = torch.zeros(R, L, *padded, dtype=sum_dtype, device=dev)
    acc_w = torch.zeros(*padded, dtype=sum_dtype, device=dev)
    with torch.inference_mode():
        for k in range(0, len(grid), batch):
            chunk = grid[k:k + batch]
            boxes = [tuple(slice(s, s + p) for s, p in zip(g, patch)) for g in chunk]
            windows = torch.stack([x[(slice(None),) + b] for b in boxes])
            p, A, q = window_outputs(model, windows, mirror_axes)
            for n, b in enumerate(boxes):
                acc_w[b] += w
                acc_p[(slice(None),) + b] += w * p[n].to(sum_dtype)
                acc_a[(slice(None),) * 3 + b] += w * A[n].to(sum_dtype)
                acc_q[(slice(None),) * 2 + b] += w * q[n].to(sum_dtype)
    inside = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    weight = acc_w[inside]
    return {
        "probs": (acc_p[(slice(None),) + inside] / weight).float(),
        "cms": (acc_a[(slice(None),) * 3 + inside] / weight).float(),
        "annotatorProbs": (acc_q[(slice(None),) * 2 + inside] / weight).float(),
        "windows": len(grid),
    }


def parse_patch(text, ndim):
    """--patch 64 (every axis) or 16,32,32 (one size per spatial axis)."""
    try:
        sizes = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--patch {text!r} must be a window size (64) or one size per spatial axis (16,32,32)") from None
    if len(sizes) == 1:
        sizes = sizes * ndim
    if len(sizes) != ndim:
        raise ValueError(f"--patch {text} must give 1 or {ndim} sizes for a {ndim}D model")
    return sizes


def run_case(case, dtype=torch.float64, device="cpu"):
    """Everything the result file holds, as a dict of CPU tensors."""
    cfg, t = case["config"], case["tensors"]
    model = CMUNet(cfg).to(device=device, dtype=dtype)
    load_parameters(model, t)
    images = t["images"].to(device=device, dtype=dtype)
    labels = t["labels"].to(device)
    n = images.shape[0]
    present = t.get("present", torch.ones(n, cfg["annotators"], dtype=torch.uint8)).to(device)
    validate_inputs(cfg, images, labels, present)
    spatial = tuple(images.shape[2:])
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    out = {}

    if "target" in t or "softTarget" in t:
        # Plain cross-entropy (methods naive/oracle) on the seg head, at the given weights:
        # hard labels, or soft targets [N, L, *S].
        logits, _ = model(images)
        if "target" in t:
            plain = plain_cross_entropy(logits, t["target"].to(device))
        else:
            plain = soft_cross_entropy(logits, t["softTarget"].to(device=device, dtype=dtype))
        grads = torch.autograd.grad(plain, params, allow_unused=True)
        out["plainCe"] = plain.detach().reshape(1)
        for name, p, g in zip(names, params, grads):
            out[f"plainGrad.{name}"] = torch.zeros_like(p) if g is None else g

    optimizer = make_optimizer(params, case["optim"]) if case["steps"] > 0 else None
    losses = []
    for i in range(max(case["steps"], 1)):
        lam = effective_lambda(case["loss"], case["step"] + i)
        logits, cms = model(images)
        loss, ce, trace, probs = annotator_loss(logits, cms, labels, present, lam)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if i == 0:
            out["probs"] = probs.detach()
            out["cms"] = expand_cms([A.detach() for A in cms], n, spatial)
            out["loss"] = loss.detach().reshape(1)
            out["ce"] = ce.detach()
            out["trace"] = trace.detach()
            for name, p, g in zip(names, params, grads):
                # Cloned: the optimiser below must not be able to touch the reported gradient.
                out[f"grad.{name}"] = torch.zeros_like(p) if g is None else g.clone()
        if optimizer is None:
            break
        losses.append(loss.detach())
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        optimizer.step()
    if optimizer is not None:
        out["losses"] = torch.stack(losses)
        for name, p in zip(names, params):
            out[f"final.{name}"] = p.detach()

    return finish_result(out)


def finish_result(out):
    """Tensors in float32, scalars in float64, contiguous, on the CPU (safetensors needs that)."""
    scalar_keys = {"loss", "ce", "trace", "losses", "plainCe"}
    result = {}
    for key, value in out.items():
        value = value.detach().to("cpu")
        value = value.to(torch.float64 if key in scalar_keys else torch.float32)
        result[key] = value.contiguous()
    return result


def command_run(args):
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if usable_device(args.device) == "cuda":
        exact_float32_on_cuda()
    case = load_case(args.case)
    result = run_case(case, dtype=dtype, device=args.device)
    meta = {"dtype": args.dtype, "device": args.device, "torch": torch.__version__}
    save_output(result, args.out, metadata=meta)
    print(json.dumps({"ok": True, "out": args.out, "loss": float(result["loss"][0]),
                      "steps": case["steps"], "dtype": args.dtype, "device": args.device}))


# ---------------------------------------------------------------------------
# Benchmark (SPEC 8)
# ---------------------------------------------------------------------------

BENCH_CONFIGS = {
    "mnist2d": {"shape": (32, 1, 32, 32), "depth": 4, "baseChannels": 32, "classes": 2, "annotators": 4},
    "brats3d-cpu": {"shape": (1, 4, 64, 64, 64), "depth": 4, "baseChannels": 16, "classes": 4, "annotators": 3},
    "brats3d-gpu": {"shape": (2, 4, 128, 128, 128), "depth": 4, "baseChannels": 32, "classes": 4, "annotators": 3},
    # Inference: one batch of sliding windows through the forward pass, p and every q_r = A_r p.
    "brats3d-cpu-predict": {"shape": (2, 4, 64, 64, 64), "depth": 4, "baseChannels": 16, "classes": 4, "annotators": 3,
                            "kind": "predict"},
    "brats3d-gpu-predict": {"shape": (2, 4, 128, 128, 128), "depth": 4, "baseChannels": 32, "classes": 4, "annotators": 3,
                            "kind": "predict"},
}
BENCH_LAMBDA = 0.01  # SPEC 8: cm full, lambda 0.01


def forward_macs(cfg, shape):
    """Multiply-accumulates of one forward pass through convs, transposed convs and heads.

    Norms, activations, pooling and the loss are left out (they are memory-bound, not
    FLOP-bound). A transposed conv with kernel = stride = 2 does one tap per output voxel.
    """
    n, spatial = shape[0], shape[2:]
    taps = 3 ** cfg["ndim"]
    depth, c = cfg["depth"], cfg["baseChannels"]
    width = [c * 2 ** k for k in range(depth)]
    voxels = [math.prod(s // 2 ** k for s in spatial) for k in range(depth)]

    def block(cin, cout, v):
        return taps * (cin * cout + cout * cout) * v

    macs = sum(block(cfg["inChannels"] if k == 0 else width[k - 1], width[k], voxels[k]) for k in range(depth))
    for k in range(depth - 1):
        lo, hi = depth - 2 - k, depth - 1 - k
        macs += width[hi] * width[lo] * voxels[lo] + block(2 * width[lo], width[lo], voxels[lo])
    heads = cfg["classes"]
    if cfg["cmMode"] != "global":
        heads += cfg["annotators"] * cm_head_channels(cfg)
        macs += cfg["annotators"] * int(cfg["cmHeadBlocks"]) * block(c, c, voxels[0])
    macs += heads * c * voxels[0]
    return n * macs


def bench_setup(args):
    spec = BENCH_CONFIGS[args.config]
    # Each a caller error naming its flag (main prints it as one JSON line): --threads -1 was
    # torch's RuntimeError, --shape a,b int()'s ValueError, both with a traceback.
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} must be >= 0")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads} must be >= 0 (0: torch's choice)")
    usable_device(args.device)
    try:
        shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else spec["shape"]
    except ValueError:
        raise ValueError(f"--shape {args.shape} must be N,C,H,W or N,C,D,H,W (whole numbers)") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise ValueError(f"--shape {args.shape} must be N,C,H,W or N,C,D,H,W (whole numbers >= 1)")
    cfg = parse_config({
        "ndim": len(shape) - 2, "inChannels": shape[1], "classes": spec["classes"],
        "annotators": spec["annotators"], "depth": spec["depth"],
        "baseChannels": spec["baseChannels"], "cmMode": "full",
    })
    gen = torch.Generator().manual_seed(0)  # random but repeatable inputs
    images = torch.randn(shape, generator=gen)
    n, spatial = shape[0], shape[2:]
    labels = torch.randint(0, cfg["classes"], (cfg["annotators"], n, *spatial), generator=gen, dtype=torch.uint8)
    present = torch.ones(n, cfg["annotators"], dtype=torch.uint8)
    validate_inputs(cfg, images, labels, present)
    return cfg, shape, images, labels, present


def bench_predict_fn(model, args):
    """One forward pass without gradients: p and each annotator's q_r = A_r p (what cmseg's predict returns)."""
    amp = args.amp == "bf16"

    def outputs(images):
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=amp):
            logits, cms = model(images)
        probs = torch.softmax(logits.float(), dim=1)
        return probs, [(a * probs.unsqueeze(1)).sum(dim=2) for a in cms]

    if args.compile:
        outputs = torch.compile(outputs)

    def step(images):
        with torch.inference_mode():
            probs, q = outputs(images)
        return probs.sum() + sum(x.sum() for x in q)  # finite when every output is

    return step


def bench_step_fn(model, optimizer, labels, present, args):
    amp = args.amp == "bf16"

    def forward_loss(images):
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=amp):
            logits, cms = model(images)
        loss, _, _, _ = annotator_loss(logits, cms, labels, present, BENCH_LAMBDA)
        return loss

    if args.compile:
        forward_loss = torch.compile(forward_loss)

    def step(images):
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(images)
        loss.backward()
        optimizer.step()
        return loss

    return step


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, images, args):
    """Untimed warm-up steps, then args.steps timed ones (device synchronised around each)."""
    for _ in range(args.warmup):
        step(images)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peak of the timed steps (cmseg's bench does the same)
    step_ms, loss = [], None
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        loss = step(images)
        synchronize(args.device)
        step_ms.append((time.perf_counter() - start) * 1e3)
    return step_ms, loss


def median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def exit_with_parent():
    """Exits when the `cmseg bench` that started this one is gone (CMSEG_BENCH_PARENT, its pid,
    no longer names a process; unset when run by hand). It waits for this one in spawnSync and
    cannot pass on a SIGTERM or `kill` it gets, so the steps went on for up to its 30-minute
    limit, on a shared machine, for nobody. A daemon thread that looks each second; torch's
    kernels release the GIL, so it runs during a step too."""
    import os
    import threading

    try:
        parent = int(os.environ.get("CMSEG_BENCH_PARENT", ""))
    except ValueError:
        return
    if parent <= 1:
        return

    def watch():
        while True:
            time.sleep(1)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(143)
            except OSError:
                pass  # alive, someone else's

    threading.Thread(target=watch, daemon=True).start()


def command_bench(args):
    global EXACT_SOFTPLUS
    EXACT_SOFTPLUS = False
    exit_with_parent()
    try:
        cfg, shape, images, labels, present = bench_setup(args)
    except ValueError as err:  # bad arguments: one JSON line that cmseg bench shows, exit 2
        print(json.dumps({"ok": False, "config": args.config, "error": f"{type(err).__name__}: {err}"}))
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    model = CMUNet(cfg).to(device)
    images, labels, present = images.to(device), labels.to(device), present.to(device)
    if args.channels_last:
        fmt = torch.channels_last if cfg["ndim"] == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        images = images.contiguous(memory_format=fmt)
    predict = BENCH_CONFIGS[args.config].get("kind") == "predict"
    if predict:
        step = bench_predict_fn(model, args)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = bench_step_fn(model, optimizer, labels, present, args)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    try:
        step_ms, loss = timed_steps(step, images, args)
    except Exception as err:  # a failed torch.compile is a result, not a crash
        if not args.compile:
            raise
        print(json.dumps({"ok": False, "config": args.config, "compile": True,
                          "error": f"{type(err).__name__}: {err}"[:2000]}))
        return 1
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError(f"bench loss is not finite: {float(loss)}")

    median_ms = median(step_ms)
    voxels = shape[0] * math.prod(shape[2:])
    # Convention: a training step costs about 3 forward passes (backward = data + weight grads);
    # a prediction one.
    step_gflop = (1 if predict else 3) * 2 * forward_macs(cfg, shape) / 1e9
    report = {
        "config": args.config, "kind": "predict" if predict else "train", "shape": list(shape), "device": device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "compile": bool(args.compile), "amp": args.amp or None,
        "channelsLast": bool(args.channels_last),
        "stepMs": [round(t, 3) for t in step_ms], "stepMsMedian": round(median_ms, 3),
        "voxelsPerSecond": voxels / (median_ms / 1e3) if median_ms > 0 else None,
        "stepGflopEstimate": round(step_gflop, 3),
        "gflopPerSecond": step_gflop / (median_ms / 1e3) if median_ms > 0 else None,
    }
    if device == "cuda":
        report["peakGpuMB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        report["gpu"] = torch.cuda.get_device_name()
    else:
        report["peakRssMB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    report["ok"] = True
    print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="PyTorch reference of the cmseg model (SPEC.md): parity oracle and benchmark peer.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Examples:" + __doc__.split("Examples:")[1])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate a case file and write a result file",
                         epilog="example: torch_reference.py run --case c.safetensors --out r.safetensors --dtype float64")
    run.add_argument("--case", required=True, help="input .safetensors written by the tests")
    run.add_argument("--out", required=True, help="output .safetensors")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="compute precision; outputs are float32 tensors and float64 scalars either way")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")

    bench = sub.add_parser("bench", help="time training steps for a SPEC section 8 configuration",
                           epilog="example: torch_reference.py bench --config brats3d-gpu --device cuda --amp bf16")
    bench.add_argument("--config", required=True, choices=sorted(BENCH_CONFIGS))
    bench.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--compile", action="store_true", help="torch.compile the forward and loss")
    bench.add_argument("--amp", choices=("bf16",), default=None, help="autocast the network to bfloat16")
    bench.add_argument("--channels-last", action="store_true", help="NHWC / NDHWC memory format")
    bench.add_argument("--shape", default=None, help="override the input shape: N,C,H,W or N,C,D,H,W")
    pred = sub.add_parser("predict", help="run a cmseg checkpoint in PyTorch on images from a .safetensors file",
                          epilog="example: torch_reference.py predict --checkpoint best.safetensors --images x.safetensors --out p.safetensors")
    pred.add_argument("--checkpoint", required=True, help="a checkpoint written by cmseg (train or saveCheckpoint)")
    pred.add_argument("--images", required=True, help=".safetensors with a float tensor 'images' [N, C, *S]")
    pred.add_argument("--out", required=True, help="output .safetensors: probs [N, L, *S], cms [N, R, L, L, *S], annotatorProbs (q_r = A_r p) [N, R, L, *S]")
    pred.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pred.add_argument("--patch", default=None,
                      help="sliding-window inference (SPEC 5) with windows of this size: 64, or one size per spatial axis (16,32,32); "
                           "without it each image is predicted whole")
    pred.add_argument("--overlap", type=float, default=None, help="fraction of a window shared with its neighbour, [0, 1) (default 0.5)")
    pred.add_argument("--batch", type=int, default=2, help="windows per forward pass (default 2; the results do not depend on it)")
    pred.add_argument("--mirror", action="store_true", help="mirror each window along every spatial axis and average (test-time augmentation)")
    pred.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    return parser


def as_caller_errors(command, args, named):
    """Bad inputs are caller errors (SPEC 1): one JSON line naming the input, no traceback; exit 2."""
    try:
        command(args)
    except (ValueError, KeyError, OSError) as err:  # OSError: FileNotFoundError, a folder not writable
        print(json.dumps({"ok": False, **named, "error": f"{type(err).__name__}: {err}"}))
        return 2
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        return as_caller_errors(command_predict, args, {"checkpoint": args.checkpoint})
    if args.command == "run":
        return as_caller_errors(command_run, args, {"case": args.case})
    return command_bench(args)


if __name__ == "__main__":
    sys.exit(main())
