"""The demo's verdict: which method gave the most accurate model at each FLOPs level and within a common latency
budget, with the margin over the runner-up and its noise on the test images, and which accuracies are at chance
level (:func:`method_verdict`; ``rankprune.demo`` runs the comparison)."""
import math
import statistics
from typing import Dict, List

from . import data

DEFAULT_PIPELINE, DATA_AWARE, WEIGHT_SVD, HYBRID, TRP, DENSE = (
    "prune: default", "decompose: data-aware", "decompose: weight SVD", "compress", "trp", "dense")
LATENCY_TARGETED = "prune: latency-targeted"
_Z95 = 1.96  # two-sided 95% normal quantile: the noise bands of accuracies


def chance_threshold(test_size: int, classes: int = data.NUM_CLASSES) -> float:
    """The accuracy at or below which a model is called chance level: ``1 / classes`` plus the 95% half-width
    of the accuracy of a random guesser on ``test_size`` images."""
    chance = 1 / classes
    return chance + _Z95 * math.sqrt(chance * (1 - chance) / test_size)


def accuracy_noise(accuracy: float, test_size: int) -> float:
    """95% half-width of the difference of two accuracies near ``accuracy``, each on ``test_size`` images."""
    return _Z95 * math.sqrt(2 * accuracy * (1 - accuracy) / test_size)


def _best_per_method(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The most accurate row of each method, most accurate first."""
    best: Dict[str, Dict[str, object]] = {}
    for r in rows:
        if r["method"] not in best or r["accuracy"] > best[r["method"]]["accuracy"]:
            best[r["method"]] = r
    return sorted(best.values(), key=lambda r: r["accuracy"], reverse=True)


def _margin(ranking: List[Dict[str, object]], test_size: int) -> Dict[str, object]:
    """The winner of ``ranking`` (best first), its margin over the runner-up and the noise of that margin (in
    accuracy points), and whether the winner is at chance level."""
    win = ranking[0]
    result = {"best": win["method"], "variant": win["variant"], "accuracy": win["accuracy"],
              "chance": win["accuracy"] <= chance_threshold(test_size),
              "ranking": [{"method": r["method"], "variant": r["variant"], "accuracy": r["accuracy"]}
                          for r in ranking]}
    if len(ranking) > 1:
        result.update(runner_up=ranking[1]["method"], margin=100 * (win["accuracy"] - ranking[1]["accuracy"]),
                      noise=100 * accuracy_noise(win["accuracy"], test_size))
    return result


def method_verdict(rows: List[Dict[str, object]], test_size: int, stage: str) -> Dict[str, object]:
    """Which method gave the most accurate model at each FLOPs level and within a common latency budget, each
    with its margin over the runner-up and the noise of that margin; the paragraph that says it (``"text"``).

    Rows need method, variant, accuracy; those compared need target_flops (equal FLOPs) and latency_ratio
    (:func:`spread` dicts: equal latency). The dense baseline and TRP are not compared. The latency budget is
    the tightest one every method that runs faster than the baseline meets: the largest, over those methods,
    of their fastest variant's median latency ratio; a method is faster when some variant's upper quartile is
    below 1. Each method then enters with its most accurate variant within the budget."""
    compared = [r for r in rows if r["method"] not in (DENSE, TRP)]
    threshold = 100 * chance_threshold(test_size)
    levels = sorted({r["target_flops"] for r in compared if r.get("target_flops") is not None}, reverse=True)
    at_flops = [{"target_flops": level, **_margin(_best_per_method(
        [r for r in compared if r["target_flops"] == level]), test_size)} for level in levels]
    wins: Dict[str, int] = {}
    for entry in at_flops:
        wins[entry["best"]] = wins.get(entry["best"], 0) + 1
    mean = {m: statistics.mean(r["accuracy"] for r in compared if r["method"] == m) for m in wins}
    flops_best = max(wins, key=lambda m: (wins[m], mean[m])) if wins else None

    timed = [r for r in compared if "latency_ratio" in r]
    fastest = {}
    for r in timed:
        if r["latency_ratio"]["q3"] < 1 and (r["method"] not in fastest or r["latency_ratio"]["median"]
                                             < fastest[r["method"]]["latency_ratio"]["median"]):
            fastest[r["method"]] = r
    slow = sorted({r["method"] for r in timed} - set(fastest))
    at_latency: Dict[str, object] = {"not_faster": {m: min(r["latency_ratio"]["median"] for r in timed
                                                           if r["method"] == m) for m in slow}}
    if fastest:
        budget = max(r["latency_ratio"]["median"] for r in fastest.values())
        ranking = _best_per_method([r for r in timed if r["method"] in fastest
                                    and r["latency_ratio"]["median"] <= budget])
        at_latency.update(budget=budget, **_margin(ranking, test_size))
        for entry in at_latency["ranking"]:
            entry["latency_ratio"] = next(r["latency_ratio"] for r in timed if r["variant"] == entry["variant"])
    else:
        at_latency["best"] = None

    sentences = []
    if at_flops:
        sentences.append(f"At equal FLOPs ({stage}), **{flops_best}** gave the most accurate model at "
                         f"{wins[flops_best]} of {len(at_flops)} FLOPs level(s): "
                         + "; ".join(f"at {e['target_flops']:.0%} of the FLOPs {e['best']} with "
                                     f"{100 * e['accuracy']:.1f}%" + _against(e, test_size) for e in at_flops) + ".")
    if at_latency["best"] is not None:
        win = at_latency["ranking"][0]
        sentences.append(
            f"At equal measured latency (the tightest budget every method that runs faster than the dense model "
            f"meets: {at_latency['budget']:.2f}x the dense model's time), **{at_latency['best']}** is the most "
            f"accurate: {_variant_text(win)}" + _against(at_latency, test_size) + ".")
    elif timed:
        sentences.append("At equal measured latency no compressed model ran faster than the dense model beyond "
                         "the noise (every variant's upper quartile at or above 1x): on this machine the dense "
                         "model is the best choice at its own latency.")
    if at_latency["not_faster"]:
        sentences.append("Not faster than the dense model beyond the noise (every variant's upper quartile at or "
                         "above 1x): " + ", ".join(f"{m} (fastest median {ratio:.2f}x)"
                                                   for m, ratio in at_latency["not_faster"].items())
                         + ": their FLOPs savings do not turn into time here.")
    targeted = [r for r in compared if r["method"] == LATENCY_TARGETED]
    if targeted:
        sentences.append("Latency-targeted pruning (prune(target_latency=t), measured here): " + ", ".join(
            f"t = {r['target_latency']:.2f}: {r['latency_ratio']['median']:.2f}x the dense latency, "
            f"{r['flops_kept']:.0%} of the FLOPs, {100 * r['accuracy']:.1f}%" for r in targeted
            if "latency_ratio" in r) + ".")
    splits = [r for r in compared if "prune_share" in r]
    if splits:
        sentences.append("The hybrid compress chose " + "; ".join(
            f"{_split_text(r['prune_share'])} at {r['target_flops']:.0%}" for r in splits) + ".")
    at_chance = [r for r in compared if r["accuracy"] <= threshold / 100]
    if at_chance:
        sentences.append(f"At chance level (at most {threshold:.1f}%: 1/{data.NUM_CLASSES} plus the noise of "
                         f"{test_size} test images): " + ", ".join(
                             f"{r['variant']} ({100 * r['accuracy']:.1f}%)" for r in at_chance) + ".")
    return {"equal_flops": {"best": flops_best, "wins": wins, "levels": at_flops}, "equal_latency": at_latency,
            "chance_threshold": threshold / 100, "stage": stage, "text": " ".join(sentences)}


def _split_text(prune_share: float) -> str:
    """What compress's chosen split means."""
    if prune_share == 1:
        return "pruning alone (the default pruning's model)"
    if prune_share == 0:
        return "decomposition alone (the data-aware decomposition's model)"
    return f"pruning for {prune_share:.2f} of the budget (in log FLOPs), decomposition for the rest"


def _variant_text(entry: Dict[str, object]) -> str:
    ratio = entry["latency_ratio"]
    return (f"{100 * entry['accuracy']:.1f}% ({entry['variant']}, {ratio['median']:.2f}x the dense latency, IQR "
            f"{ratio['q1']:.2f}-{ratio['q3']:.2f})")


def _against(entry: Dict[str, object], test_size: int) -> str:
    """``against <runner-up>: margin m points, within/beyond the noise`` (empty without a runner-up)."""
    if "runner_up" not in entry:
        return " (the only method compared)"
    runner = entry["ranking"][1]
    text = f" against {runner['method']} {100 * runner['accuracy']:.1f}%"
    if "latency_ratio" in runner:
        text += f" ({runner['latency_ratio']['median']:.2f}x)"
    tied = entry["margin"] < entry["noise"]
    text += (f", a margin of {entry['margin']:.1f} points, {'within' if tied else 'beyond'} the noise of "
             f"{entry['noise']:.1f} points (95%, {test_size} test images)" + (": a tie" if tied else ""))
    if entry["chance"]:
        text += "; but at chance level: no method beats guessing here"
    return text
