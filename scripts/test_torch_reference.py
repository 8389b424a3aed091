#!/usr/bin/env python3
"""Self-test of scripts/torch_reference.py against SPEC.md. Plain Python; exits 1 on failure.

What it checks, and why each matters for an oracle:
  names      state_dict keys and shapes are the SPEC 2 names, built here from the SPEC text.
  cm+loss    CMs and the loss agree with a loop-by-loop NumPy transcription of SPEC 3-4,
             including 255 labels, an absent annotator and an annotator with no labels.
  formulas   the SPEC 4 hand-derived gradients (the fused-kernel formulas) equal autograd.
  identity   with every A = I the annotator CE equals plain cross-entropy of p.
  fd         finite differences (float64) of the whole model's loss, 2D and 3D, every CM mode.
  adam       one step of Adam / AdamW equals the closed form of a first Adam step.
  roundtrip  case file -> CLI -> result file: keys, shapes, dtypes, values, warm-up.
  errors     bad labels / shapes are rejected with a message naming the input.
  sliding    SPEC 5 sliding windows: window starts, the Gaussian map (a tiny sigma too) and the
             weighted mean over windows, against hand-computed values with a fake network.
  predict    predict's bad arguments (patch, batch, threads, overlap, sizes) are caller errors.
  bench      the bench command prints one JSON line with ok: true.

Run: python3 scripts/test_torch_reference.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(message)
        print(f"  FAIL {message}")


def close(a, b, rtol, atol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=atol)
    err = float(np.max(np.abs(a - b))) if a.shape == b.shape and a.size else float("nan")
    check(ok, f"{what}: max abs err {err:.3e} (shapes {a.shape} vs {b.shape})")


def tiny_config(ndim, mode, depth=2, blocks=0, L=3, R=3):
    return ref.parse_config({
        "ndim": ndim, "inChannels": 2, "classes": L, "annotators": R, "depth": depth,
        "baseChannels": 2, "cmMode": mode, "cmRank": 2, "cmHeadBlocks": blocks,
    })


def random_problem(cfg, n=2, size=8, seed=0):
    """Images, labels with ~20% 255s, annotator 1 absent from image 0, and random weights."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (size,) * cfg["ndim"]
    images = torch.randn(n, cfg["inChannels"], *spatial, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, cfg["classes"], (cfg["annotators"], n, *spatial), generator=gen).to(torch.uint8)
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = 255
    present = torch.ones(n, cfg["annotators"], dtype=torch.uint8)
    present[0, 1] = 0
    torch.manual_seed(seed)
    model = ref.CMUNet(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("gcm"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)  # non-trivial affine / CMs
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model, images, labels, present


# ---------------------------------------------------------------------------
# NumPy transcription of SPEC 3-4 (pixel by pixel, deliberately naive)
# ---------------------------------------------------------------------------

def np_softplus(x):
    return np.log1p(np.exp(x))


def np_cm(raw, mode, L, rank):
    """raw: channel vector of one pixel (or the [L,L] gcm) -> A [L,L]."""
    if mode == "global":
        a = np_softplus(raw)
    elif mode == "full":
        a = np.array([[np_softplus(raw[i * L + j]) for j in range(L)] for i in range(L)])
    else:
        a = np.zeros((L, L))
        for i in range(L):
            for j in range(L):
                a[i, j] = sum(np_softplus(raw[i * rank + k]) * np_softplus(raw[L * rank + j * rank + k])
                              for k in range(rank))
                if i == j:
                    a[i, j] += np_softplus(raw[2 * L * rank])
    return a / a.sum(axis=0, keepdims=True)


def np_loss(logits, raws, labels, present, mode, L, rank, lam):
    """logits [N,L,V]; raws[r]: [N,ch,V] or [L,L]; labels [R,N,V]; present [N,R]."""
    N, _, V = logits.shape
    R = labels.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ce, tr = np.zeros(R), np.zeros(R)
    for r in range(R):
        nll, count, trace_sum, pixels = 0.0, 0, 0.0, 0
        for n in range(N):
            if not present[n, r]:
                continue
            for v in range(V):
                A = np_cm(raws[r] if mode == "global" else raws[r][n, :, v], mode, L, rank)
                trace_sum += np.trace(A)
                pixels += 1
                c = labels[r, n, v]
                if c == 255:
                    continue
                q = A @ p[n, :, v]
                nll -= np.log(max(q[c], 1e-12))
                count += 1
        if count:
            ce[r], tr[r] = nll / count, trace_sum / pixels
    return ce.sum() + lam * tr.sum(), ce, tr, p


def head_outputs(model, images):
    """Seg logits and raw CM head outputs (pixel-wise) or gcm parameters (global)."""
    feats = model.features(images)
    logits = model.seg(feats)
    raws = []
    for r in range(model.cfg["annotators"]):
        if model.gcm is not None:
            raws.append(model.gcm[r])
            continue
        h = feats
        if model.cmblock is not None:
            for block in model.cmblock[r]:
                h = block(h)
        raws.append(model.cm[r](h))
    return logits, raws


def test_names():
    print("names")
    for ndim, mode, depth, blocks in [(2, "full", 3, 0), (3, "lowrank", 2, 2), (2, "global", 1, 0), (3, "full", 1, 1)]:
        cfg = tiny_config(ndim, mode, depth, blocks)
        c, L, R, C, l = 2, cfg["classes"], cfg["annotators"], cfg["inChannels"], cfg["cmRank"]
        k3, k2, k1 = [3] * ndim, [2] * ndim, [1] * ndim
        want = {}

        def block(prefix, cin, cout):
            want[f"{prefix}.conv1.weight"] = [cout, cin, *k3]
            want[f"{prefix}.norm1.weight"] = want[f"{prefix}.norm1.bias"] = [cout]
            want[f"{prefix}.conv2.weight"] = [cout, cout, *k3]
            want[f"{prefix}.norm2.weight"] = want[f"{prefix}.norm2.bias"] = [cout]

        w = [c * 2 ** k for k in range(depth)]
        for k in range(depth):
            block(f"enc.{k}", C if k == 0 else w[k - 1], w[k])
        for k in range(depth - 1):
            want[f"up.{k}.weight"] = [w[depth - 1 - k], w[depth - 2 - k], *k2]
            want[f"up.{k}.bias"] = [w[depth - 2 - k]]
            block(f"dec.{k}", 2 * w[depth - 2 - k], w[depth - 2 - k])
        want["seg.weight"], want["seg.bias"] = [L, c, *k1], [L]
        for r in range(R):
            if mode == "global":
                want[f"gcm.{r}"] = [L, L]
                continue
            for b in range(blocks):
                block(f"cmblock.{r}.{b}", c, c)
            ch = L * L if mode == "full" else 2 * L * l + 1
            want[f"cm.{r}.weight"], want[f"cm.{r}.bias"] = [ch, c, *k1], [ch]
        got = {k: list(v.shape) for k, v in ref.CMUNet(cfg).state_dict().items()}
        check(got == want, f"names {ndim}D {mode} depth {depth} blocks {blocks}: "
                           f"extra {sorted(set(got) - set(want))} missing {sorted(set(want) - set(got))} "
                           f"shape diffs {[k for k in want if k in got and got[k] != want[k]]}")


def test_cm_and_loss():
    print("cm+loss")
    for mode in ("full", "lowrank", "global"):
        cfg = tiny_config(2, mode, depth=1, R=4)
        model, images, labels, present = random_problem(cfg, n=2, size=4, seed=1)
        labels[2] = 255  # annotator 2: present but never labels -> 0 in both terms (SPEC 4)
        present[:, 3] = 0  # annotator 3: absent everywhere
        lam = 0.37
        with torch.no_grad():
            logits, cms = model(images)
            loss, ce, tr, probs = ref.annotator_loss(logits, cms, labels, present, lam)
            logits_h, raws = head_outputs(model, images)
        N, L = images.shape[0], cfg["classes"]
        raws_np = [r.detach().numpy() if mode == "global" else r.reshape(N, r.shape[1], -1).numpy() for r in raws]
        want_loss, want_ce, want_tr, want_p = np_loss(
            logits_h.reshape(N, L, -1).numpy(), raws_np, labels.reshape(cfg["annotators"], N, -1).numpy(),
            present.numpy(), mode, L, cfg["cmRank"], lam)
        close(loss.item(), want_loss, 1e-12, 1e-12, f"{mode} loss vs numpy")
        close(ce.numpy(), want_ce, 1e-12, 1e-12, f"{mode} CE_r vs numpy")
        close(tr.numpy(), want_tr, 1e-12, 1e-12, f"{mode} T_r vs numpy")
        close(probs.reshape(N, L, -1).numpy(), want_p, 1e-12, 1e-12, f"{mode} probs vs numpy")
        # CM layout and column sums for the result file.
        cm5 = ref.expand_cms(cms, N, images.shape[2:])
        n, r, v = 1, 0, 5
        A = np_cm(raws_np[r] if mode == "global" else raws_np[r][n, :, v], mode, L, cfg["cmRank"])
        close(cm5[n, r].reshape(L, L, -1)[:, :, v].numpy(), A, 1e-12, 1e-12, f"{mode} cms[n,r,i,j,v] layout")
        close(cm5.sum(dim=2).numpy(), np.ones_like(cm5.sum(dim=2).numpy()), 1e-12, 1e-12, f"{mode} columns sum to 1")
        check(ce[2].item() == 0 and tr[2].item() == 0 and ce[3].item() == 0 and tr[3].item() == 0,
              f"{mode} annotators without labels contribute 0")


def test_spec_gradient_formulas():
    """SPEC 4 closed-form gradients (what fused kernels implement) against autograd."""
    print("formulas")
    gen = torch.Generator().manual_seed(3)
    N, L, R, V = 2, 3, 2, 7
    z = torch.randn(N, L, V, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.randn(R, N, L * L, V, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, L, (R, N, V), generator=gen).to(torch.uint8)
    labels[0, 0, :3] = 255
    present = torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8)
    cfg = {"classes": L, "cmMode": "full"}
    for lam in (0.1, -0.5):
        cms = [ref.cm_from_raw(u[r], cfg) for r in range(R)]
        loss, _, _, _ = ref.annotator_loss(z, cms, labels, present, lam)
        gz, gu = torch.autograd.grad(loss, [z, u])

        zz, uu, lab, pres = z.detach().numpy(), u.detach().numpy(), labels.numpy(), present.numpy()
        p = np.exp(zz - zz.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dp = np.zeros_like(p)
        du = np.zeros_like(uu)
        for r in range(R):
            valid = (lab[r] != 255) & (pres[:, r][:, None] > 0)
            w_ce = 1.0 / valid.sum()
            w_tr = lam / (pres[:, r].sum() * V)
            for n in range(N):
                for v in range(V):
                    a = np_softplus(uu[r, n, :, v].reshape(L, L))
                    S = a.sum(0)
                    A = a / S
                    g = np.zeros((L, L))
                    if pres[n, r]:
                        g += w_tr * np.eye(L)
                    if valid[n, v]:
                        c = lab[r, n, v]
                        q = A @ p[n, :, v]
                        g[c, :] -= w_ce * p[n, :, v] / q[c]
                        dp[n, :, v] += -w_ce * A[c, :] / q[c]
                    da = (g - (g * A).sum(0, keepdims=True)) / S
                    du[r, n, :, v] = (da / (1 + np.exp(-uu[r, n, :, v].reshape(L, L)))).reshape(-1)
        dz = p * (dp - (p * dp).sum(1, keepdims=True))
        close(gz.numpy(), dz, 1e-10, 1e-12, f"SPEC dL/dz formula (lam {lam})")
        close(gu.numpy(), du, 1e-10, 1e-12, f"SPEC dL/du formula (lam {lam})")


def test_identity_cms():
    print("identity")
    cfg = tiny_config(2, "full", depth=2)
    model, images, labels, present = random_problem(cfg, seed=4)
    with torch.no_grad():
        logits, _ = model(images)
        L, N = cfg["classes"], images.shape[0]
        eye = torch.eye(L, dtype=torch.float64).view(1, L, L, 1, 1)
        loss, ce, tr, _ = ref.annotator_loss(logits, [eye] * cfg["annotators"], labels, present, 0.25)
        for r in range(cfg["annotators"]):
            target = labels[r].clone()
            target[present[:, r] == 0] = 255
            close(ce[r].item(), ref.plain_cross_entropy(logits, target).item(), 1e-12, 1e-14,
                  f"identity CM: CE_{r} == plain CE")
        close(tr.numpy(), np.full(cfg["annotators"], L), 0, 1e-12, "identity CM: T_r == L")
        close(loss.item(), ce.sum().item() + 0.25 * L * cfg["annotators"], 1e-12, 1e-12, "identity CM: loss")


def case_from_model(model, images, labels, present, loss_cfg, optim_cfg, steps, step=0, dtype=torch.float32):
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    tensors.update(images=images.to(dtype).contiguous(), labels=labels.contiguous(), present=present.contiguous())
    return {"config": model.cfg, "loss": loss_cfg, "optim": optim_cfg, "steps": steps, "step": step,
            "tensors": tensors}


def model_loss(cfg, params, images, labels, present, lam):
    model = ref.CMUNet(cfg).double()
    ref.load_parameters(model, params)
    logits, cms = model(images)
    return ref.annotator_loss(logits, cms, labels, present, lam)[0].item()


def test_finite_differences():
    print("fd")
    loss_cfg = {"lambda": 0.3, "lambdaWarmup": 0.0, "warmupSteps": 0}
    rng = np.random.default_rng(5)
    cases = [(2, "full", 2, 0), (2, "lowrank", 2, 1), (2, "global", 2, 0),
             (3, "full", 2, 0), (3, "lowrank", 1, 0), (3, "global", 2, 0)]
    for ndim, mode, depth, blocks in cases:
        cfg = tiny_config(ndim, mode, depth, blocks)
        model, images, labels, present = random_problem(cfg, size=8 if ndim == 2 else 4, seed=6)
        case = case_from_model(model, images, labels, present, loss_cfg, {}, 0, dtype=torch.float64)
        result = ref.run_case(case, dtype=torch.float64)
        grads = {k[5:]: v.double() for k, v in result.items() if k.startswith("grad.")}
        params = {k: v.clone() for k, v in case["tensors"].items() if k in grads}
        what = f"{ndim}D {mode} depth {depth} blocks {blocks}"
        eps = 1e-6

        def loss_at(shifted):
            return model_loss(cfg, shifted, images, labels, present, loss_cfg["lambda"])

        # One entry of every parameter tensor, by central differences.
        bad = []
        for name, value in params.items():
            idx = tuple(int(rng.integers(0, s)) for s in value.shape)
            plus, minus = dict(params), dict(params)
            plus[name], minus[name] = value.clone(), value.clone()
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            # grads went through float32 in the result file; compare with that precision.
            an = grads[name][idx].item()
            if abs(fd - an) > 1e-5 * max(1.0, abs(fd)):
                bad.append(f"{name}{list(idx)} fd {fd:.8g} autograd {an:.8g}")
        check(not bad, f"fd per-entry {what}: {bad}")

        # All parameters at once along a random direction, against the float64 gradient.
        model64 = ref.CMUNet(cfg).double()
        ref.load_parameters(model64, params)
        logits, cms = model64(images)
        loss = ref.annotator_loss(logits, cms, labels, present, loss_cfg["lambda"])[0]
        g64 = dict(zip([n for n, _ in model64.named_parameters()],
                       torch.autograd.grad(loss, list(model64.parameters()))))
        direction = {k: torch.from_numpy(rng.standard_normal(v.shape)) for k, v in params.items()}
        plus = {k: v + eps * direction[k] for k, v in params.items()}
        minus = {k: v - eps * direction[k] for k, v in params.items()}
        fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        an = sum((g64[k] * direction[k]).sum().item() for k in params)
        check(abs(fd - an) <= 1e-6 * max(1.0, abs(an)), f"fd directional {what}: fd {fd:.10g} autograd {an:.10g}")


def test_adam_closed_form():
    """After one step from zero moments, Adam moves each weight by lr * g / (|g| + eps)."""
    print("adam")
    cfg = tiny_config(2, "full", depth=2)
    model, images, labels, present = random_problem(cfg, seed=7)
    loss_cfg = {"lambda": 0.01}
    lr, eps, wd = 1e-2, 1e-8, 0.1
    for kind in ("adam", "adamw"):
        optim_cfg = {"kind": kind, "lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": eps, "weightDecay": wd}
        case = case_from_model(model, images, labels, present, loss_cfg, optim_cfg, 1, dtype=torch.float64)
        result = ref.run_case(case, dtype=torch.float64)
        worst = 0.0
        for name, w in case["tensors"].items():
            if f"grad.{name}" not in result:
                continue
            g = result[f"grad.{name}"].double()
            if kind == "adam":
                g = g + wd * w  # L2: decay enters the moments
                want = w - lr * g / (g.abs() + eps)
            else:
                want = w * (1 - lr * wd) - lr * g / (g.abs() + eps)
            # Entries with |g| near eps are sensitive to the float32 gradient; skip them.
            keep = g.abs() > 1e-4
            diff = (result[f"final.{name}"].double() - want)[keep].abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        check(worst < 1e-6, f"{kind} first step closed form: max err {worst:.3e}")


def test_roundtrip():
    print("roundtrip")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg = tiny_config(3, "lowrank", depth=2, blocks=1)
    model, images, labels, present = random_problem(cfg, size=4, seed=8)
    loss_cfg = {"lambda": 0.05, "lambdaWarmup": 0.2, "warmupSteps": 1}
    optim_cfg = {"kind": "adamw", "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weightDecay": 0.01}
    case = case_from_model(model, images, labels, present, loss_cfg, optim_cfg, 3)
    with tempfile.TemporaryDirectory() as tmp:
        case_path = os.path.join(tmp, "case.safetensors")
        meta = {"config": json.dumps(cfg), "loss": json.dumps(loss_cfg), "optim": json.dumps(optim_cfg),
                "steps": "3", "step": "0"}
        save_file(case["tensors"], case_path, metadata=meta)
        results = {}
        for dtype in ("float64", "float32"):
            out_path = os.path.join(tmp, f"result-{dtype}.safetensors")
            proc = subprocess.run([sys.executable, SCRIPT, "run", "--case", case_path, "--out", out_path,
                                   "--dtype", dtype], capture_output=True, text=True)
            check(proc.returncode == 0, f"run --dtype {dtype} exit {proc.returncode}: {proc.stderr[-500:]}")
            if proc.returncode:
                return
            results[dtype] = load_file(out_path)
            with safe_open(out_path, framework="pt") as f:
                check((f.metadata() or {}).get("dtype") == dtype, "result metadata names the dtype")
        res = results["float64"]

        N, L, R, S = images.shape[0], cfg["classes"], cfg["annotators"], tuple(images.shape[2:])
        names = list(model.state_dict().keys())
        want_shapes = {"probs": (N, L, *S), "cms": (N, R, L, L, *S), "loss": (1,), "ce": (R,), "trace": (R,),
                       "losses": (3,)}
        for name in names:
            want_shapes[f"grad.{name}"] = want_shapes[f"final.{name}"] = tuple(model.state_dict()[name].shape)
        check(set(res) == set(want_shapes), f"result keys: extra {set(res) - set(want_shapes)} "
                                            f"missing {set(want_shapes) - set(res)}")
        for key, shape in want_shapes.items():
            if key in res:
                want_dtype = torch.float64 if key in ("loss", "ce", "trace", "losses") else torch.float32
                check(tuple(res[key].shape) == shape and res[key].dtype == want_dtype,
                      f"{key}: {tuple(res[key].shape)} {res[key].dtype}, want {shape} {want_dtype}")

        # Values: in-process loss at the warm-up lambda, then the post-warm-up lambda.
        tensors64 = {k: v.double() for k, v in case["tensors"].items() if k in names}
        images64 = images.float().double()  # the case stores float32 images
        loss0 = model_loss(cfg, tensors64, images64, labels, present, -0.2)
        close(res["loss"][0].item(), loss0, 1e-12, 1e-12, "loss uses -lambdaWarmup at step 0")
        close(res["losses"][0].item(), loss0, 1e-12, 1e-12, "losses[0] == loss")
        close(res["ce"].sum().item() - 0.2 * res["trace"].sum().item(), loss0, 1e-12, 1e-12, "loss == sum CE - lw*sum T")
        check(res["losses"][1].item() != res["losses"][0].item(), "losses change across steps")
        finals = {k[6:]: v.double() for k, v in res.items() if k.startswith("final.")}
        loss1 = model_loss(cfg, finals, images64, labels, present, 0.05)
        check(res["losses"][2].item() < loss0 + 1.0, "losses stay finite")
        # losses[1] is taken at the weights after one step; recompute via a 1-step case.
        one = dict(case, steps=1)
        one_res = ref.run_case(one, dtype=torch.float64)
        after1 = {k[6:]: v.double() for k, v in one_res.items() if k.startswith("final.")}
        close(res["losses"][1].item(), model_loss(cfg, after1, images64, labels, present, 0.05), 1e-6, 1e-7,
              "losses[1] uses lambda after warm-up")
        check(np.isfinite(loss1), "final weights give a finite loss")

        # A bad case gives exit status 2 and one JSON line naming the input, not a traceback.
        bad = dict(case["tensors"], labels=labels.clone())
        bad["labels"][0, 1, 0, 0, 0] = 9
        bad_path = os.path.join(tmp, "bad.safetensors")
        save_file(bad, bad_path, metadata=meta)
        proc = subprocess.run([sys.executable, SCRIPT, "run", "--case", bad_path, "--out", os.path.join(tmp, "x")],
                              capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        check(proc.returncode == 2 and len(lines) == 1 and "labels value 9" in json.loads(lines[0])["error"],
              f"bad case: rc {proc.returncode} out {proc.stdout[-300:]} err {proc.stderr[-300:]}")

        # float32 run agrees with float64 run.
        r32 = results["float32"]
        for key in ("probs", "cms", "loss", "ce", "trace", "losses"):
            close(r32[key].numpy(), res[key].numpy(), 1e-4, 1e-5, f"float32 vs float64 {key}")
        worst = max(float((r32[k] - res[k]).abs().max() / res[k].abs().max().clamp_min(1e-3))
                    for k in res if k.startswith("grad."))
        check(worst < 1e-3, f"float32 vs float64 gradients: worst relative error {worst:.3e}")


def test_errors():
    print("errors")
    cfg = tiny_config(2, "full", depth=2)
    model, images, labels, present = random_problem(cfg, seed=9)
    bad_labels = labels.clone()
    bad_labels[1, 0, 2, 3] = 7
    bad_images = images.clone()
    bad_images[0, 0, 0, 1] = float("nan")
    params = {k: v for k, v in model.state_dict().items()}
    cases = [
        ({"labels": bad_labels}, "labels value 7"),
        ({"images": bad_images}, "NaN"),
        ({"images": images[:, :, :7, :7]}, "not divisible"),
        ({"present": present[:, :2]}, "present has shape"),
        ({"seg.bias": torch.zeros(5, dtype=torch.float64)}, "seg.bias"),
    ]
    for change, expect in cases:
        tensors = dict(params, images=images, labels=labels, present=present)
        tensors.update(change)
        case = {"config": cfg, "loss": {}, "optim": {}, "steps": 0, "step": 0, "tensors": tensors}
        try:
            ref.run_case(case)
            check(False, f"expected an error mentioning '{expect}'")
        except ValueError as err:
            check(expect in str(err), f"error '{err}' should mention '{expect}'")


def test_config_defaults():
    print("config defaults")
    # cmseg's defaults (src/model/config.ts): c 32 in 2D, 16 in 3D; an explicit value stays.
    base = {"inChannels": 1, "classes": 2, "annotators": 2}
    check(ref.parse_config(dict(base, ndim=2))["baseChannels"] == 32, "2D default c is 32")
    check(ref.parse_config(dict(base, ndim=3))["baseChannels"] == 16, "3D default c is 16")
    check(ref.parse_config(dict(base, ndim=3, baseChannels=32))["baseChannels"] == 32, "an explicit c stays")


def test_loss_defaults():
    """The loss settings a case leaves out take cmseg's defaults (src/model/config.ts, README
    "Loss"): lambda 0.01, lambdaWarmup equal to lambda, warmupSteps 0."""
    print("loss defaults")
    cases = [  # (loss settings, steps taken, the effective lambda cmseg uses)
        ({"lambda": 0.05, "warmupSteps": 2}, 0, -0.05),
        ({"lambda": 0.05, "warmupSteps": 2}, 1, -0.05),
        ({"lambda": 0.05, "warmupSteps": 2}, 2, 0.05),
        ({"lambda": 0.05, "lambdaWarmup": 0.2, "warmupSteps": 2}, 0, -0.2),
        ({"lambda": 0.05, "lambdaWarmup": 0.0, "warmupSteps": 2}, 0, 0.0),
        ({"warmupSteps": 1}, 0, -0.01),
        ({"warmupSteps": 1}, 1, 0.01),
        ({}, 0, 0.01),
    ]
    for loss_cfg, steps_taken, want in cases:
        got = ref.effective_lambda(loss_cfg, steps_taken)
        check(abs(got - want) < 1e-15, f"effective_lambda({loss_cfg}, {steps_taken}) = {got}, expected {want}")
    # Through a case run: the first step's loss is taken with -lambda when lambdaWarmup is left out.
    cfg = tiny_config(2, "full", depth=2)
    model, images, labels, present = random_problem(cfg, size=4, seed=3)
    case = case_from_model(model, images, labels, present, {"lambda": 0.05, "warmupSteps": 1},
                           {"kind": "adam", "lr": 1e-3}, 1, dtype=torch.float64)
    res = ref.run_case(case, dtype=torch.float64)
    params = {k: v for k, v in case["tensors"].items() if k in model.state_dict()}
    want = model_loss(cfg, params, images.double(), labels, present, -0.05)
    close(res["loss"][0].item(), want, 1e-12, 1e-12, "a case without lambdaWarmup warms up with -lambda")


class OffsetModel(torch.nn.Module):
    """A fake 2D network whose consensus logit of class 1 is the column of the voxel within
    its window (divided by 4), class 0 has logit 0, and whose CM is the identity: stitched
    outputs then show where every window was placed and how it was weighted."""

    def __init__(self):
        super().__init__()
        self.cfg = {"ndim": 2, "inChannels": 1, "classes": 2, "annotators": 1, "depth": 1}

    def forward(self, images):
        n, _, h, w = images.shape
        col = torch.arange(w, dtype=images.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        logits = torch.cat([torch.zeros_like(col), col / 4], dim=1)
        return logits, [torch.eye(2, dtype=images.dtype).view(1, 2, 2, 1, 1)]


def test_sliding_window():
    """SPEC 5 sliding windows: starts, the Gaussian map and the weighted mean, by hand."""
    print("sliding window")
    starts = {(37, 16, 0.5): [0, 7, 14, 21], (45, 16, 0.75): [0, 4, 7, 11, 15, 18, 22, 25, 29],
              (29, 16, 0.25): [0, 7, 13], (16, 16, 0.5): [0], (10, 16, 0.5): [0],
              (56, 40, 0.8): [0, 8, 16], (40, 16, 0.0): [0, 12, 24]}
    for (size, patch, overlap), want in starts.items():
        got = ref.window_starts(size, patch, overlap)
        check(got == want, f"window_starts({size}, {patch}, {overlap}) = {got}, expected {want}")
    # Patch 5: centre 2, sigma 5/8; the corners' exp(-5.12 - 5.12) is under the 1e-3 floor.
    w = ref.importance_map([5, 5])
    close(w[2, 2], 1.0, 0, 1e-12, "importance map centre")
    close(w[2, 1], np.exp(-0.5 * 1.6 ** 2), 0, 1e-12, "importance map one voxel off the centre")
    close(w[2, 0], np.exp(-0.5 * 3.2 ** 2), 0, 1e-12, "importance map at the border")
    close(w[0, 0], 1e-3, 0, 1e-15, "importance map floor")
    # A tiny sigma: every Gaussian value underflows to 0; the centre must still weigh 1.
    tiny = ref.importance_map([16, 16, 16], 0.001)
    check(bool(torch.isfinite(tiny).all()) and float(tiny.max()) == 1.0 and int((tiny == 1).sum()) == 8
          and float(tiny.min()) == 1e-3, f"importance map with sigma_scale 0.001: {int(torch.isnan(tiny).sum())} NaN, max {float(tiny.max())}")

    # Two windows along x (starts 0 and 8 of a 24-wide image, patch 16): at column x the
    # stitched p1 is the Gaussian-weighted mean of sigmoid(offset / 4) over the windows covering x.
    model = OffsetModel()
    sig = 2.0  # 16 / 8
    g = lambda o: max(np.exp(-0.5 * ((o - 7.5) / sig) ** 2) / np.exp(-0.5 * (0.5 / sig) ** 2), 1e-3)
    f = lambda o: 1 / (1 + np.exp(-o / 4))
    out = ref.sliding_window_predict(model, torch.zeros(1, 16, 24, dtype=torch.float64), [16, 16], overlap=0.5)
    check(out["windows"] == 2, f"windows {out['windows']}, expected 2")
    want = []
    for x in range(24):
        offsets = [x - s for s in (0, 8) if 0 <= x - s < 16]
        want.append(sum(g(o) * f(o) for o in offsets) / sum(g(o) for o in offsets))
    # Row 7 is next to the window centre (7.5): its weights are g(column) alone (elsewhere the
    # floor applies to the product of the axes' factors, which then does not cancel).
    close(out["probs"][1, 7].numpy(), want, 0, 1e-6, "stitched p over two windows")
    close(out["annotatorProbs"][0, 1, 7].numpy(), want, 0, 1e-6, "stitched q_r = A_r p (A = I)")
    close(out["cms"][0].sum(dim=0).numpy(), np.ones((2, 16, 24)), 0, 1e-6, "stitched CM columns sum to 1")
    # An image 10 wide, narrower than the patch: centred with 3 zeros in front, so column x
    # is window column x + 3.
    out = ref.sliding_window_predict(model, torch.zeros(1, 16, 10, dtype=torch.float64), [16, 16])
    close(out["probs"][1, 0].numpy(), [f(x + 3) for x in range(10)], 0, 1e-6, "image narrower than the patch, centred")
    # Mirroring x: window column o is predicted as 15 - o, flipped back.
    out = ref.sliding_window_predict(model, torch.zeros(1, 16, 16, dtype=torch.float64), [16, 16], mirror=[1])
    close(out["probs"][1, 0].numpy(), [(f(x) + f(15 - x)) / 2 for x in range(16)], 0, 1e-6, "mirrored along x")


def test_predict_errors():
    """predict's bad arguments are one JSON line naming the argument, exit 2, no traceback."""
    print("predict errors")
    from safetensors.torch import save_file

    cfg = tiny_config(3, "full", depth=2)
    model = ref.CMUNet(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, images = os.path.join(tmp, "ckpt.safetensors"), os.path.join(tmp, "images.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt,
                  metadata={"format": "cmseg-checkpoint", "version": "1", "config": json.dumps(cfg)})
        save_file({"images": torch.randn(1, 2, 9, 10, 11)}, images)
        cases = [
            (["--patch", "abc"], "--patch 'abc'"),
            (["--patch", "8", "--batch", "0"], "--batch 0 must be"),
            (["--patch", "8", "--threads", "-1"], "--threads -1 must be"),
            (["--patch", "8", "--overlap", "1"], "overlap 1.0 must be in [0, 1)"),
            # Whole images must fit the U-Net: 9 is not a multiple of 2; say so, and name --patch.
            ([], "not divisible by 2^(depth-1) = 2"),
        ]
        for extra, message in cases:
            proc = subprocess.run([sys.executable, SCRIPT, "predict", "--checkpoint", ckpt, "--images", images,
                                   "--out", os.path.join(tmp, "out.safetensors"), *extra], capture_output=True, text=True)
            check(proc.returncode == 2 and message in proc.stdout and "Traceback" not in proc.stderr,
                  f"predict {' '.join(extra)}: rc {proc.returncode}, out {proc.stdout.strip()[-200:]}, err {proc.stderr.strip()[-200:]}")


def test_bench():
    print("bench")
    for config, shape in (("mnist2d", "4,1,16,16"), ("brats3d-cpu", "1,4,16,16,16")):
        proc = subprocess.run([sys.executable, SCRIPT, "bench", "--config", config, "--shape", shape,
                               "--steps", "2", "--warmup", "1", "--threads", "1"], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        ok = proc.returncode == 0 and len(lines) == 1
        report = json.loads(lines[0]) if ok else {}
        check(ok and report.get("ok") is True and len(report.get("stepMs", [])) == 2
              and report.get("peakRssMB", 0) > 0 and report.get("threads") == 1,
              f"bench {config}: rc {proc.returncode} out {proc.stdout[-300:]} err {proc.stderr[-300:]}")


def main():
    torch.set_num_threads(1)  # tiny tensors: threads only add noise
    start = time.perf_counter()
    for test in (test_names, test_cm_and_loss, test_spec_gradient_formulas, test_identity_cms,
                 test_finite_differences, test_adam_closed_form, test_roundtrip, test_errors, test_config_defaults,
                 test_loss_defaults, test_sliding_window, test_predict_errors, test_bench):
        test()
    seconds = time.perf_counter() - start
    if FAILURES:
        print(f"{len(FAILURES)} failure(s) in {seconds:.1f} s")
        return 1
    print(f"all torch_reference checks passed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
