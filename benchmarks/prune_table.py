"""Structured pruning on the real DINOv2 ViT-S/14: fidelity, MACs, params and speed per budget.

    uv run --extra bench python benchmarks/prune_table.py [--budgets 0.1,0.2,0.3,0.4,0.5]
        [--recover-steps 120] [--json prune_table.json]

Images: a seeded split of imagenet-sample: ``--eval`` images measure fidelity (CLS feature
cosine vs FP32) and are never used otherwise; calibration (``--calib``) and recovery images come
from the rest. For each importance score (magnitude, activation, hessian) and budget: train-free
without and with least-squares compensation; Torch-Pruning (GroupMagnitudeImportance, its
default; heads + MLP channels, uniform ratio searched to the same MAC budget) is the peer.
Recovery (self-distillation, same steps and images for both) at ``--recover-at``. Speed: every
pruned model timed interleaved with the unpruned one in one run, in PyTorch and in ONNX
Runtime. Composition: prune + ToMe + int8 (ONNX Runtime) against PyTorch FP32 eager.
Stages run most-important first and the JSON is rewritten after each, so a cut-short run
still reports what it measured.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from _common import SHARED_IMAGES
from vitslim import compare, quant, tokens
from vitslim.bench import count_gmacs, count_params, machine_info
from vitslim.data import calibration_images, calibration_split, load_image_folder
from vitslim.export import export_onnx
from vitslim.models import load_reference_model, vit_parts
from vitslim.output import print_table, write_json
from vitslim.prune import PruneConfig, RecoverConfig, recover_
from vitslim.prune.allocate import allocate
from vitslim.prune.compensate import compensate_
from vitslim.prune.importance import compensated_scores, importance_scores
from vitslim.prune.surgery import apply_plan

SIZE = (3, 224, 224)


def cosine(model, images, reference) -> float:
    with torch.inference_mode():
        out = torch.cat([model(images[i:i + 32]) for i in range(0, len(images), 32)])
    return float(torch.nn.functional.cosine_similarity(out, reference).mean())


def torch_pruning_model(fp32, budget: float, base_gmacs: float):
    """Torch-Pruning's default magnitude importance, pruning heads and MLP channels at one
    uniform ratio, searched (bisection) to keep at most ``budget`` of the MACs."""
    import torch_pruning as tp

    def pruned(ratio):
        model = copy.deepcopy(fp32)
        parts = vit_parts(model)
        ignored = [model.patch_embed.proj] + [m for bp in parts.blocks for m in (bp.proj, bp.fc2)]
        pruner = tp.pruner.MetaPruner(
            model, torch.randn(1, *SIZE), importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, head_pruning_ratio=ratio, ignored_layers=ignored,
            num_heads={bp.qkv: bp.num_heads for bp in parts.blocks}, prune_num_heads=True, prune_head_dims=False)
        pruner.step()
        for bp in parts.blocks:  # what Torch-Pruning users fix by hand
            bp.attn.num_heads = pruner.num_heads[bp.attn.qkv]
            bp.attn.attn_dim = bp.attn.num_heads * bp.attn.head_dim
        return model

    lo, hi = 0.0, 0.95
    for _ in range(8):
        mid = (lo + hi) / 2
        if count_gmacs(pruned(mid), SIZE) / base_gmacs > budget:
            lo = mid
        else:
            hi = mid
    return pruned(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=SHARED_IMAGES)
    ap.add_argument("--budgets", default="0.3,0.1,0.2,0.4,0.5",
                    help="Fractions of MACs removed (first is measured first).")
    ap.add_argument("--importances", default="hessian,activation,magnitude")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--recover-steps", type=int, default=120)
    ap.add_argument("--recover-at", type=float, default=0.3)
    ap.add_argument("--tome", type=int, default=8)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--stages", default="fidelity,peer,speed,recovery,composition",
                    help="Which parts to run (fidelity is always run: the others use its models).")
    ap.add_argument("--min-width", type=float, default=0.0, help="PruneConfig.min_width for the vitslim rows.")
    ap.add_argument("--refit-aware", action=argparse.BooleanOptionalAction, default=True,
                    help="PruneConfig.refit_aware for the vitslim rows (OBS ranking of heads and channels).")
    ap.add_argument("--recover-refit", action=argparse.BooleanOptionalAction, default=True,
                    help="RecoverConfig.refit: least-squares refits again on the recovery images first.")
    ap.add_argument("--recover-block-iters", type=int, default=RecoverConfig.block_iters,
                    help="RecoverConfig.block_iters: block reconstruction steps per block after the refit.")
    ap.add_argument("--recover-images", type=int, default=0,
                    help="Recovery images (0: every image not held out for evaluation).")
    ap.add_argument("--json", type=Path, default=Path("prune_table.json"))
    args = ap.parse_args()
    removed = [float(b) for b in args.budgets.split(",")]
    out = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "fidelity": [],
           "recovery": [], "speed": [], "composition": []}
    save = lambda: write_json(args.json, out)  # noqa: E731

    fp32 = load_reference_model()
    dataset = load_image_folder(args.images, fp32)
    eval_set, train_set = calibration_split(dataset, args.eval, seed=0)
    eval_images = calibration_images(eval_set)
    calib = calibration_images(Subset(dataset, train_set.indices[:args.calib]))
    with torch.inference_mode():
        reference = torch.cat([fp32(eval_images[i:i + 32]) for i in range(0, len(eval_images), 32)])
    base_gmacs = count_gmacs(fp32, SIZE)
    parts = vit_parts(fp32)
    scores, score_seconds, models = {}, {}, {}

    def fidelity_rows(budget_removed: float) -> None:
        for importance in args.importances.split(","):
            if importance not in scores:
                start = time.perf_counter()
                scores[importance] = importance_scores(fp32, calib, importance)
                if args.refit_aware:
                    scores[importance] = compensated_scores(fp32, parts, calib, scores[importance], 8)
                score_seconds[importance] = time.perf_counter() - start
            config = PruneConfig(macs=1 - budget_removed, importance=importance, min_width=args.min_width,
                                 refit_aware=args.refit_aware)
            plan = allocate(parts, scores[importance], config)
            model = apply_plan(copy.deepcopy(fp32), plan)
            raw = cosine(model, eval_images, reference)
            start = time.perf_counter()
            compensate_(model, fp32, calib, plan, mirrors=config.mirror_refit)
            seconds = score_seconds[importance] + time.perf_counter() - start
            models[(importance, budget_removed)] = model
            out["fidelity"].append({"removed": budget_removed, "method": f"vitslim {importance}",
                                    "cosine_no_comp": raw, "cosine": cosine(model, eval_images, reference),
                                    "gmacs": count_gmacs(model, SIZE), "params_m": count_params(model) / 1e6,
                                    "seconds": seconds, "heads": model.vitslim_prune["heads"],
                                    "mlp": model.vitslim_prune["mlp"]})
            print(out["fidelity"][-1], flush=True)
            save()
        if "peer" not in stages:
            return
        start = time.perf_counter()
        model = torch_pruning_model(fp32, 1 - budget_removed, base_gmacs)
        models[("tp", budget_removed)] = model
        out["fidelity"].append({"removed": budget_removed, "method": "Torch-Pruning magnitude",
                                "cosine": cosine(model, eval_images, reference), "gmacs": count_gmacs(model, SIZE),
                                "params_m": count_params(model) / 1e6, "seconds": time.perf_counter() - start,
                                "heads": [b.attn.num_heads for b in model.blocks],
                                "mlp": [b.mlp.fc1.out_features for b in model.blocks]})
        print(out["fidelity"][-1], flush=True)
        save()

    def speed_row(budget_removed: float, workdir: Path) -> None:
        candidates = {"fp32": fp32, "vitslim": models[("hessian", budget_removed)],
                      "tp": models[("tp", budget_removed)]}
        onnx = {f"{k} ort": export_onnx(m, workdir / f"{k}_{budget_removed}.onnx") for k, m in candidates.items()}
        res = {r.name: r for r in compare(candidates | onnx, batch_size=8, iters=args.iters, warmup=1, flops=False)}
        out["speed"].append({"removed": budget_removed,
                             "vitslim_torch": res["vitslim"].throughput / res["fp32"].throughput,
                             "vitslim_ort": res["vitslim ort"].throughput / res["fp32 ort"].throughput,
                             "tp_torch": res["tp"].throughput / res["fp32"].throughput,
                             "tp_ort": res["tp ort"].throughput / res["fp32 ort"].throughput,
                             "fp32_ort_vs_torch": res["fp32 ort"].throughput / res["fp32"].throughput})
        print(out["speed"][-1], flush=True)
        save()

    def recovery_rows() -> None:
        recover_images = Subset(dataset, train_set.indices[:args.recover_images or None])
        config = RecoverConfig(steps=args.recover_steps, batch_size=8, refit=args.recover_refit,
                               block_iters=args.recover_block_iters)
        for key, name in ((("hessian", args.recover_at), "vitslim hessian"),
                          (("tp", args.recover_at), "Torch-Pruning magnitude")):
            if key not in models:
                continue
            model = models[key]
            report = recover_(model, fp32, recover_images, config)
            out["recovery"].append({"removed": args.recover_at, "method": name, "refit": config.refit,
                                    "block_iters": config.block_iters, "steps": config.steps,
                                    "batch": config.batch_size, "images": len(recover_images),
                                    "cosine": cosine(model, eval_images, reference), "seconds": report.seconds})
            print(out["recovery"][-1], flush=True)
            save()

    def composition_row(workdir: Path) -> None:
        model = copy.deepcopy(models[("hessian", args.recover_at)])
        tokens.reduce_tokens_(model, tokens.ToMeConfig(r=args.tome))
        qmodel = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-ort"), calib)
        path = export_onnx(qmodel, workdir / "composed.onnx")
        from vitslim.bench import OnnxModel

        onnx = OnnxModel(path)
        res = compare({"fp32": fp32, "composed": path}, batch_size=8, iters=args.iters, warmup=1, flops=False)
        out["composition"].append({"removed": args.recover_at, "tome_r": args.tome, "preset": "w8a8-ort",
                                   "recovered": bool(out["recovery"]), "speedup_vs_torch_fp32_b8": res[1].speedup,
                                   "cosine": cosine(onnx, eval_images, reference)})
        print(out["composition"][-1], flush=True)
        save()

    stages = set(args.stages.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        fidelity_rows(removed[0])
        if "speed" in stages:
            speed_row(removed[0], Path(tmp))
        if (args.recover_steps or args.recover_refit or args.recover_block_iters) and "recovery" in stages:
            recovery_rows()
        if "composition" in stages:
            composition_row(Path(tmp))
        for budget_removed in removed[1:]:
            fidelity_rows(budget_removed)
            if "speed" in stages:
                speed_row(budget_removed, Path(tmp))
    out["score_seconds"] = score_seconds
    save()
    print_table("pruning: DINOv2 ViT-S/14", out["fidelity"], {
        "removed": "MACs removed", "method": "method", "cosine_no_comp": "cosine (no comp.)", "cosine": "cosine",
        "gmacs": "GMACs", "params_m": "params M", "seconds": "seconds"},
        caption=f"{machine_info()['cpu']}; {args.calib} calibration, {args.eval} held-out images")
    print_table("recovery", out["recovery"], {"method": "method", "steps": "steps", "cosine": "cosine", "seconds": "s"})
    print_table("speed (× unpruned, batch 8)", out["speed"], {
        "removed": "removed", "vitslim_torch": "vitslim PyTorch", "vitslim_ort": "vitslim ORT",
        "tp_torch": "TP PyTorch", "tp_ort": "TP ORT"})


if __name__ == "__main__":
    main()
