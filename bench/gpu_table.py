"""The headline table of a GPU check's results (a library of bench/, no main; `gpu_bench.py --table_of FILE`).

Reads only the results JSON: the numerics tolerances are the ones stored with the numerics section, so an old
file is shown with the tolerances it was judged by.
"""
from __future__ import annotations


def fmt(value, spec=".2f") -> str:
    """A number formatted, or '-' when missing."""
    return "-" if value is None else format(value, spec)


def throughput_rows(s: dict) -> list[str]:
    """images/s, peak GiB, ratio to the bare loop and MFU of every training variant measured."""
    bare, lora = s.get("bare_full", {}), s.get("lora", {})
    lines = [f"{'':34s}{'images/s':>10s}{'peak GiB':>10s}{'vs bare':>9s}{'MFU':>8s}{'MFU/matmul':>11s}"]

    def row(name, record, ratio=None, util=None):
        if record and "images_per_s" in record:
            util = util or {}
            lines.append(f"{name:34s}{record['images_per_s']:10.2f}{fmt(record.get('peak_allocated_gib')):>10s}"
                         f"{fmt(ratio, '.3f'):>9s}{fmt(util.get('mfu_vs_datasheet'), '.1%'):>8s}"
                         f"{fmt(util.get('mfu_vs_measured_matmul'), '.1%'):>11s}")

    row(f"bare full (batch {bare.get('batch')})", bare, None, s.get("flops", {}).get("bare_full_mfu"))
    for key, name in (("finetune_cached", "finetune.py full, input cache"),
                      ("finetune_uncached", "finetune.py full, no cache"), ("finetune_full", "finetune.py full")):
        record = s.get(key, {})
        row(name, record, record.get("ratio_to_bare"), record.get("mfu"))
    if "bare" in lora:
        row("bare LoRA", lora["bare"], None, lora["bare"].get("mfu"))
    ft_lora = s.get("finetune_lora", {})
    row("finetune.py LoRA, input cache", ft_lora, ft_lora.get("ratio_to_bare"), ft_lora.get("mfu"))
    z = s.get("zero2", {})
    row("finetune.py ZeRO-2 (1 proc)", z, z.get("ratio_to_plain_finetune"))
    return lines


def cache_lines(s: dict) -> list[str]:
    """The input cache's build (seconds, MiB, peak memory) and cached over uncached throughput."""
    lines = []
    cached, uncached = s.get("finetune_cached", {}), s.get("finetune_uncached", {})
    for name, build in cached.get("cache", {}).items():
        lines.append(f"input cache {name}: built in {build.get('build_seconds', 0):.1f} s, "
                     f"{build.get('mib', 0):.1f} MiB, peak {build.get('peak_memory_gib', 0):.2f} GiB")
    if "cached_over_uncached" in uncached:
        lines.append(f"finetune.py with / without the input cache: x{uncached['cached_over_uncached']:.3f} images/s")
    return lines


def option_lines(s: dict) -> list[str]:
    """Each measured on/off option's speed-up (on over off images/s)."""
    lines, toggles = [], s.get("toggles", {})
    entries = [toggles.get("fused_adamw"), toggles.get("channels_last"),
               *toggles.get("attention", {}).values(),
               *(v for k, v in toggles.items() if k.startswith("bf16_autocast_vs_")), s.get("compile")]
    for entry in entries:
        if isinstance(entry, dict) and "speedup" in entry and "option" in entry:
            lines.append(f"  {entry['option']:44s} x{entry['speedup']:.3f} (batch {entry['batch']}, "
                         f"{fmt(entry.get('on_images_per_s'))} vs {fmt(entry.get('off_images_per_s'))} images/s)")
    return ["on / off, bare loop:"] + lines if lines else []


def table(results: dict) -> str:
    """The headline figures, one per line."""
    s = results["sections"]
    env = s.get("env", {})
    lines = [f"card {env.get('card')}  torch {env.get('torch')}  bf16 peak {fmt(env.get('bf16_peak_tflops'), '.0f')} "
             f"TFLOP/s (datasheet), matmul {fmt(env.get('matmul_bf16_tflops'), '.0f')} TFLOP/s (measured)",
             *throughput_rows(s), *cache_lines(s)]
    if "share_of_training_time" in s.get("probe_cost", {}):
        p = s["probe_cost"]
        lines.append(f"probe pass {p['pass_s']:.3f} s = {p['training_steps_per_pass']:.2f} steps; share at "
                     f"probe_steps={p['default_probe_steps']}: {p['share_of_training_time']:.2%}")
    if "ratio_analysis_to_plain" in s.get("eval", {}):
        e = s["eval"]
        lines.append(f"eval: capture+M1-M6 {e['analysis_images_per_s']:.2f} img/s vs pipeline "
                     f"{e['plain_images_per_s']:.2f} img/s: ratio {e['ratio_analysis_to_plain']:.3f}")
    numerics = s.get("numerics", {})
    for variant in ("bf16_autocast", "bf16_weights"):
        n = numerics.get(variant)
        if n:
            lines.append(f"numerics {variant} vs fp32: max loss rel {n['max_loss_rel']:.2e} (tol "
                         f"{numerics.get('loss_rtol')}), max k abs {n['max_k_abs']:.2e}, scaled "
                         f"{n['max_k_scaled']:.2e} (tol {numerics.get('k_atol')}): "
                         f"{'within' if n['within_tolerance'] else 'OUTSIDE'} tolerance")
    lines += option_lines(s)
    for name, status in results["status"].items():
        if status != "ok":
            lines.append(f"section {name}: {status}")
    return "\n".join(lines)
