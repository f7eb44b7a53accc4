"""The headline table of bench/gpu_bench.py's results (also `gpu_bench.py --table_of RESULTS.json`)."""
from __future__ import annotations


def fmt(value, spec=".2f") -> str:
    """A number formatted, or '-' when missing."""
    return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
    """The headline figures, one per line."""
    from bench.gpu_bench import K_ATOL, LOSS_RTOL  # the numerics tolerances the bench judged with
    s = results["sections"]
    env, bare, ft, lora = s.get("env", {}), s.get("bare_full", {}), s.get("finetune_full", {}), s.get("lora", {})
    lines = [f"card {env.get('card')}  torch {env.get('torch')}  bf16 peak {fmt(env.get('bf16_peak_tflops'), '.0f')} "
             f"TFLOP/s (datasheet), matmul {fmt(env.get('matmul_bf16_tflops'), '.0f')} TFLOP/s (measured)",
             f"{'':28s}{'images/s':>10s}{'peak GiB':>10s}{'vs bare':>9s}{'MFU':>8s}"]

    def row(name, record, ratio=None, util=None):
        if record and "images_per_s" in record:
            lines.append(f"{name:28s}{record['images_per_s']:10.2f}{fmt(record.get('peak_allocated_gib')):>10s}"
                         f"{fmt(ratio, '.3f'):>9s}{fmt(util, '.1%'):>8s}")

    row(f"bare full (batch {bare.get('batch')})", bare, None,
        s.get("flops", {}).get("bare_full_mfu", {}).get("mfu_vs_datasheet"))
    row("finetune.py full", ft, ft.get("ratio_to_bare"), ft.get("mfu", {}).get("mfu_vs_datasheet"))
    if "bare" in lora:
        row("bare LoRA", lora["bare"], None, lora["bare"]["mfu"].get("mfu_vs_datasheet"))
    ft_lora = s.get("finetune_lora", {})
    row("finetune.py LoRA", ft_lora, ft_lora.get("ratio_to_bare"), ft_lora.get("mfu", {}).get("mfu_vs_datasheet"))
    z = s.get("zero2", {})
    row("finetune.py ZeRO-2 (1 proc)", z, z.get("ratio_to_plain_finetune"))
    if "share_of_training_time" in s.get("probe_cost", {}):
        p = s["probe_cost"]
        lines.append(f"probe pass {p['pass_s']:.3f} s = {p['training_steps_per_pass']:.2f} steps; share at "
                     f"probe_steps={p['default_probe_steps']}: {p['share_of_training_time']:.2%}")
    if "ratio_analysis_to_plain" in s.get("eval", {}):
        e = s["eval"]
        lines.append(f"eval: capture+M1-M6 {e['analysis_images_per_s']:.2f} img/s vs pipeline "
                     f"{e['plain_images_per_s']:.2f} img/s: ratio {e['ratio_analysis_to_plain']:.3f}")
    for variant in ("bf16_autocast", "bf16_weights"):
        n = s.get("numerics", {}).get(variant)
        if n:
            lines.append(f"numerics {variant} vs fp32: max loss rel {n['max_loss_rel']:.2e} (tol {LOSS_RTOL}), "
                         f"max k abs {n['max_k_abs']:.2e}, scaled {n['max_k_scaled']:.2e} (tol {K_ATOL}): "
                         f"{'within' if n['within_tolerance'] else 'OUTSIDE'} tolerance")
    sp = s.get("speedups", {})
    if "channels_last" in sp:
        lines.append(f"speed-ups: channels_last x{sp['channels_last']['speedup']:.3f}; SDPA vs classic "
                     f"x{sp['attention']['speedup']:.3f} (batch {sp['attention']['batch']}); allow_tf32 on fp32 "
                     f"x{sp['tf32_float32_path']['speedup_allow_tf32_vs_strict']:.3f} vs strict, "
                     f"x{sp['tf32_float32_path']['speedup_allow_tf32_vs_torch_default']:.3f} vs torch default")
    c = s.get("compile", {})
    if "speedup" in c:
        lines.append(f"torch.compile ({c['backend']}): x{c['speedup']:.3f}, compile {c['compile_s']:.1f} s")
    fc = s.get("finetune_compile", {})
    if "speedup_vs_eager" in fc:
        lines.append(f"finetune.py --torch_compile: x{fc['speedup_vs_eager']:.3f}, first step "
                     f"{fc['first_step_s']:.1f} s (compile about {fc['compile_s']:.1f} s)")
    for name, status in results["status"].items():
        if status != "ok":
            lines.append(f"section {name}: {status}")
    return "\n".join(lines)
