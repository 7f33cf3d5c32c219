"""Render README's results section from bench/results/*.json.

    python bench/report.py            # rewrite the section between the markers in README.md
    python bench/report.py --check    # exit 1 if README's section is not what the JSON says

Every number in the section comes from a JSON file a benchmark wrote, next to the command that
wrote it and the machine it ran on; tests/test_report.py keeps README and the files in step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchrec_dist.evaluate.metrics import seen_protocol  # noqa: E402

BEGIN, END = "<!-- results:begin (bench/report.py writes this) -->", "<!-- results:end -->"


def load_results(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _machine(m: dict) -> str:
    device = m.get("device") or "CPU"
    cpus = f", {m['cpus']} cores" if m.get("cpus") else ""
    return f"{device}{cpus}"


def speed_rows(r: dict[str, dict]) -> list[str]:
    rows = []
    if "shard" in r:
        s = r["shard"]
        rows.append(f"| sharding {s['input']['interactions'] / 1e6:.0f}M interactions ({s['input']['users']:,} users, "
                    f"histories up to {s['input']['max_history']:,}) | {s['interactions_per_s'] / 1e6:.2f}M "
                    f"interactions/s, peak RSS {s['peak_rss_tree_sum_gb']:.2f} GB (tool and workers; largest "
                    f"process {s['peak_rss_largest_process_gb']:.2f} GB) | `{s['command']}` | "
                    f"{_machine(s['machine'])} |")
    if "shard_scaling" in r:
        s, met = r["shard_scaling"], {True: "met", False: "not met"}
        rss, speed = s["goals"]["peak_rss_tree_sum_gb_below"], s["goals"]["interactions_per_s_at_least"]

        def per_size(fmt: str, key: str, scale: float = 1.0) -> str:
            return " / ".join(format(x[key] / scale, fmt) for x in s["rows"])

        rows.append(f"| sharding scaling, {per_size('g', 'interactions', 1e6)}M interactions (same synthetic "
                    f"distribution, memory limit {s['tool']['memory_limit']}; plot `bench/results/shard_scaling.png`) | "
                    f"{per_size('.2f', 'interactions_per_s', 1e6)}M interactions/s, peak RSS (tool + workers) "
                    f"{per_size('.1f', 'peak_rss_tree_sum_gb')} GB; < {rss['goal']:g} GB at every size "
                    f"{met[rss['met']]}, >= {speed['goal'] / 1e6:g}M interactions/s at {speed['at'] / 1e6:g}M "
                    f"{met[speed['met']]} | `{s['command']}` | {_machine(s['machine'])} |")
    if "patching" in r:
        p = r["patching"]
        w = p["worker_examples_per_s_per_core"]
        for name, row in w.items():
            rows.append(f"| patching worker, {name} | {row['examples_per_s']:,.0f} examples/s/core "
                        f"({row['positions_fed_per_example']:.0f} of {row['all_text_positions_per_example']:,.0f} "
                        f"all-text positions) | `{p['command']}` | {_machine(p['machine'])} |")
        e = p["patch_embed_speedup_vs_per_item_loop"]
        rows.append(f"| one-call patch embedding vs the released per-item loop ({e['batch']} x {e['history_items']} "
                    f"items, {e['embedding']}, {e['what']}, equal outputs and grads: {e['outputs_and_grads_equal']}) | "
                    f"{e['speedup']:.0f}x | `{p['command']}` | {_machine(p['machine'])} |")
    if "train_step" in r:
        t = r["train_step"]
        for model, cells in t["summary"].items():
            for mb, c in cells.items():
                steps = t["runs"][model][mb]
                ratios = "; ".join(f"{k} {steps[k]['pft-s']['median_s']['step_s']:.3g} / "
                                   f"{steps[k]['text']['median_s']['step_s']:.3g} s = {v:.2f}"
                                   for k, v in c["step_time_ratio"].items())
                shares = c["pft_s_step_shares"]
                rows.append(f"| train step pft-s(5) / text(100 items), {model}, micro-batch {mb.rsplit('_', 1)[1]}, "
                            f"ZeRO-3, 1 rank | {ratios}; limit (input positions) {c['input_positions_ratio']:.2f}, "
                            f"history positions {c['history_positions_ratio']:.2f}; pft-s step: optimizer "
                            f"{shares['optimizer']:.0%}, fixed forward+backward "
                            f"{c['forward_backward_fit']['fixed_share_of_pft_s_step']:.0%} | `{t['command']}` | "
                            f"{_machine(t['machine'])} |")
    if "train_step-gpu" in r:
        t = r["train_step-gpu"]
        cut = "" if t.get("complete", True) else "; the run was cut short by its time limit after these"
        for model, row in t["runs"].items():
            for mb, cell in row.items():
                if not mb.startswith("micro_batch_"):
                    continue
                parts = "; ".join(f"{packing}: text {pair['text']['median_s']['step_s']:.3g} s, pft-s "
                                  f"{pair['pft-s']['median_s']['step_s']:.3g} s (MFU {pair['text']['mfu']:.1%}, "
                                  f"{pair['pft-s']['mfu']:.1%})" for packing, pair in cell.items()
                                  if "text" in pair and "pft-s" in pair)
                rows.append(f"| train step on a GPU, {model}, micro-batch {mb.rsplit('_', 1)[1]}, bf16, ZeRO-3, "
                            f"1 GPU{cut} | {parts} | `{t['command']}` | {_machine(t['machine'])} |")
    if "checkpoint" in r:
        c = r["checkpoint"]
        for model, m in c["models"].items():
            shape = f"{m['params'] / 1e6:,.0f}M parameters" + (f", {m['layers']} of Llama-3.2-1B's 16 layers" if "layers" in m else "")
            for kind, t in m["targets"].items():
                copy = t["plain_copy"]
                rows.append(f"| checkpoint save / load, {model} ({shape}), {c['ranks']} ranks, to {kind} "
                            f"({t['bytes'] / 1e9:.2f} GB) | {t['save_GBps']:.2f} / {t['load_GBps']:.2f} GB/s; a plain "
                            f"copy of the same files: {copy['write_GBps']:.2f} / {copy['read_GBps']:.2f} GB/s | "
                            f"`{c['command']}` | {_machine(c['machine'])} |")
            e = m["export"]
            rows.append(f"| HF export at the end of training, {model} ({shape}, {e['dtype']}) | {e['export_s']:.1f} s "
                        f"for {e['bytes'] / 1e9:.2f} GB, rank 0 +{e['rank0_rss_above_before_gb']:.2f} GB resident; "
                        f"from_pretrained {e['from_pretrained_s']:.1f} s | `{c['command']}` | {_machine(c['machine'])} |")
    if "recommend" in r:
        c = r["recommend"]
        for model, m in c["models"].items():
            pos = m["positions"]
            rows.append(f"| batch recommendations, {model}, {c['layout']}, every user of ml-100k ({m['users']:,}), "
                        f"whole histories, {c['beams']} beams, {c['ranks']} ranks | {m['users_per_s_per_rank']:.2f} "
                        f"users/s per rank ({pos['fed_mean']:.0f} of {pos['all_text_mean']:.0f} all-text positions "
                        f"per user) | `{c['command']}` | {_machine(c['machine'])} |")
    for key in ("evaluate", "evaluate-smollm2"):
        if key not in r:
            continue
        v = r[key]
        eps, model = v["examples_per_s"], v["setup"]["model"].split(" (")[0]
        if "released-reference" in eps:
            rows.append(f"| evaluation ({model}): KV-cache trie beam search vs the released protocol "
                        f"({v['setup']['beams']} beams, same top-{v['setup']['top_k']}: {v['same_top_k']}) | "
                        f"{eps['kv-cache']:.1f} vs {eps['released-reference']:.1f} examples/s = {v['speedup']:.1f}x | "
                        f"`{v['command']}` | {_machine(v['machine'])} |")
        if "hf-generate-cached" in eps:
            rows.append(f"| evaluation ({model}): KV-cache trie beam search vs stock `generate(inputs_embeds=..., "
                        f"num_beams={v['setup']['beams']}, use_cache=True)` with a vectorised trie processor "
                        f"(same top-{v['setup']['top_k']}: {v['same_top_k']}) | {eps['kv-cache']:.1f} vs "
                        f"{eps['hf-generate-cached']:.1f} examples/s = {v['speedup_vs_hf_generate_cached']:.2f}x | "
                        f"`{v['command']}` | {_machine(v['machine'])} |")
    if "exact" in r:
        x = r["exact"]
        for row in x["rows"].values():
            for decoding, key in (("20-beam search (`--decoding beam`)", "agreement"),
                                  ("the paper's diverse beam groups (`--decoding paper`)", "agreement_paper")):
                a, d = row[key], row["beam" if key == "agreement" else "paper"]
                rows.append(f"| {decoding} vs the exact catalog ranking (`--decoding exact`), {row['model']}, "
                            f"{x['data']}, first {row['examples']} examples | top-20 the same set "
                            f"{a['top20_same_set']:.0%}, same order {a['top20_same_order']:.0%}, same top-1 "
                            f"{a['top1_same']:.0%}, overlap {a['top20_overlap']:.0%}; HR@20 {d['metrics']['HR@20']:.3f} "
                            f"vs {row['exact']['metrics']['HR@20']:.3f}; {d['s_per_example']:.2f} vs "
                            f"{row['exact']['s_per_example']:.2f} s/example | `{x['command']}` | {_machine(x['machine'])} |")
    return rows


def positions_table(p: dict) -> list[str]:
    table = p["positions_fed_per_test_example"]
    if not isinstance(table, dict):
        return []
    cols = ["text", "pft-i(5)", "pft-s(5)", "pft-s(20)"]
    out = ["| data set | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in table["table"].items():
        cells = [str(row["text"])] + [f"{row[c]} ({row[c] / row['text']:.0%})" for c in cols[1:]]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def quality_tables(r: dict[str, dict]) -> list[str]:
    out = []
    cols = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@10", "NDCG@20")
    for key in sorted(k for k in r if k.startswith("quality-")):
        q = r[key]
        out += ["", f"**{q['data']}**: {q['model']}, {q['steps']} fine-tuning steps per layout (micro-batch "
                f"{q['micro_batch']} x {q['ranks']} ranks, lr {q['lr']}), first {q['examples']} test examples; "
                f"`{q['command']}` on {_machine(q['machine'])}, {q['total_s'] / 60:.0f} min. "
                f"Plot: `bench/results/{key}.png`."]
        # older results files were scored one way only, without masking the history
        protocols = q.get("history", {"metrics": seen_protocol(False)})
        for metrics_key, protocol in protocols.items():
            out += ["", f"{protocol[0].upper()}{protocol[1:]}:", "",
                    "| model | positions fed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
            for name, row in q["rows"].items():
                fed = row["positions_fed_per_example"]
                out.append(f"| {name} | {'-' if fed is None else f'{fed:.0f}'} | " +
                           " | ".join(f"{row[metrics_key].get(c, float('nan')):.4f}" for c in cols) + " |")
    return out


def demo_table(r: dict[str, dict]) -> list[str]:
    d = r.get("demo")
    if not d:
        return []
    cols = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@10", "NDCG@20")
    c = d["config"]
    out = ["", f"**`make demo`** (MovieLens-100K, {c['model']}, PPT {c['pretrain_steps']} steps then PFT-S "
           f"{c['finetune_steps']} steps, {c['ranks']} ranks; first {d['examples']} test examples): "
           f"{d['total_s'] / 60:.1f} min on {_machine(d.get('machine', {}))} (`{d.get('command', 'make demo')}`, "
           "set-up, wheel downloads and the one-time GGUF conversion not included). History positions fed: "
           f"{d['positions']['history_positions_fed_per_example']:.0f} per example against "
           f"{d['positions']['history_positions_all_text_per_example']:.0f} as all text; "
           f"{d.get('history', seen_protocol(False))}.", "",
           "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in d["metrics"].items():
        out.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in cols) + " |")
    return out


def needle_table(r: dict[str, dict]) -> list[str]:
    """HR@1 per needle distance k, one row per layout, for every needle*.json; HR@10 beside it
    where it can tell layouts apart (fewer than 10 needles: 10 guesses cover them all)."""
    out = []
    for key in sorted(k for k in r if k.startswith("needle")):
        n = r[key]
        t = n["task"]
        with_hr10 = n["chance"]["HR@10"] < 1
        ks = sorted({k for per_k in n["results"].values() for k in per_k}, key=int)
        what = ("HR@1 (HR@10, chance " + f"{n['chance']['HR@10']:.2f})" if with_hr10 else
                f"HR@1 (HR@10 is 1.00 by construction: 10 guesses cover {t['needles']} needles)")
        cut = "" if n.get("complete", True) else " The run was cut short: these layouts finished."
        out += ["", f"**Needle task, `{key}`** ({n['train_examples']:,} train users, histories of {t['min_history']} "
                f"to {t['max_history']} items, {t['needles']} needles: chance HR@1 {n['chance']['HR@1']:.3f}): "
                f"{n['model']}, " + (f"{n['pretrain_steps']} patch pre-training steps, then "
                                     if n.get("pretrain_steps") else "") +
                f"{n['steps']} fine-tuning steps per layout (micro-batch {n['micro_batch']} x "
                f"{n['ranks']} ranks, lr {n['lr']}, `{n.get('ds_config', 'ds_configs/zero3.json')}`); "
                f"`{n['command']}` on {_machine(n['machine'])}, "
                f"{n['total_s'] / 60:.1f} min. {what} of the target by the needle's distance k. Plot: "
                f"`bench/results/{key}.png`.{cut}" + (f" Note: {n['note']}." if n.get("note") else ""), "",
                "| layout | positions fed | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
        for layout, per_k in n["results"].items():
            fed = n["overall"][layout]["positions_fed_per_example"]
            cells = [("-" if k not in per_k else f"{per_k[k]['HR@1']:.2f}" +
                      (f" ({per_k[k]['HR@10']:.2f})" if with_hr10 else "")) for k in ks]
            out.append(f"| {layout} | {fed:.0f} | " + " | ".join(cells) + " |")
    return out


def render(results: dict[str, dict]) -> str:
    lines = [BEGIN, "", "Each row is one run of its command; ratios come from the same run. Full numbers: "
             "`bench/results/*.json`.", "",
             "| what | result | command | machine |", "|---|---|---|---|", *speed_rows(results)]
    if "patching" in results and positions_table(results["patching"]):
        lines += ["", "History positions fed per test example (100-item window, Llama-3.2 tokens), equal to the "
                  "paper's data as reference.md lists them:", "", *positions_table(results["patching"])]
    q = quality_tables(results) + needle_table(results) + demo_table(results)
    if q:
        lines += ["", "### Recommendation quality", *q]
    lines += ["", END]
    return "\n".join(lines)


def splice(readme: str, section: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no results markers ({BEGIN} ... {END})")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + section + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--results", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    readme = Path(args.readme).read_text()
    updated = splice(readme, render(load_results(Path(args.results))))
    if args.check:
        if updated != readme:
            print(f"{args.readme}: the results section is out of date; run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    Path(args.readme).write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
