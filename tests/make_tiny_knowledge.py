"""Make the tiny word LM (ARPA) and the tiny poetry corpus the fusion tests run on.

- ``tests/fixtures/tiny_lm/tiny.arpa``: a word trigram LM estimated from the handful
  of segmented sentences below (interpolated absolute discounting, D = 0.5, written
  in back-off form: every n-gram seen, plus a back-off weight per history), with
  every single character of the sentences as a unigram too, so that segmentation has
  choices (公园 or 公 园). Written by this script, so it carries this project's license
  (``LICENSE`` beside it).
- ``tests/fixtures/tiny_poetry/``: a few works in chinese-poetry's JSON layout (public
  domain texts), with a ``LICENSE`` file, for ``tools memory build``.

    python tests/make_tiny_knowledge.py     # rewrites both folders

Deterministic: the same script writes the same bytes.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LM_DIR = ROOT / "tests" / "fixtures" / "tiny_lm"
POETRY_DIR = ROOT / "tests" / "fixtures" / "tiny_poetry"

SENTENCES = [
    "床前 明月 光", "疑是 地上 霜", "举头 望 明月", "低头 思 故乡",
    "我们 去 公园 散步", "今天 天气 很 好", "我们 去 公园 玩", "他们 在 公园 里",
    "我们 坐 飞机 去 北京", "他 每天 早上 都 喝 咖啡", "我 在 银行 存 钱", "他 在 银行 工作",
    "中国 的 首都 是 北京", "学而时习之", "不亦 说 乎", "天气 很 好", "地上 有 霜",
    "明月 在 天上", "我们 是 中国 人", "他 是 一个 好人", "马到成功", "守株待兔",
]
D = 0.5  # absolute discount


def estimate(sentences: list[str]) -> dict[int, dict[tuple, tuple[float, float | None]]]:
    """n -> {ngram: (log10 p, log10 backoff or None)} for n = 1..3."""
    counts = {n: Counter() for n in (1, 2, 3)}
    for line in sentences:
        words = line.split()
        for n in (1, 2, 3):
            for i in range(len(words) - n + 1):
                counts[n][tuple(words[i : i + n])] += 1
    chars = sorted({ch for line in sentences for ch in line.replace(" ", "")})
    for ch in chars:
        counts[1].setdefault((ch,), 0)
    total = sum(counts[1].values())
    vocab = len(counts[1]) + 1  # + <unk>
    # Unigrams: discounted counts plus a uniform share of what was taken off.
    seen = sum(1 for c in counts[1].values() if c > 0)
    uni = {}
    for gram, c in counts[1].items():
        uni[gram] = (max(c - D, 0) + D * seen / vocab) / total
    uni[("<unk>",)] = D * seen / vocab / total
    norm = sum(uni.values())
    uni = {g: p / norm for g, p in uni.items()}

    def lower(gram: tuple) -> float:
        return probs[len(gram)][gram] if gram in probs[len(gram)] else backoff_p(gram)

    probs: dict[int, dict[tuple, float]] = {1: uni, 2: {}, 3: {}}
    gamma: dict[int, dict[tuple, float]] = {1: {}, 2: {}}

    def backoff_p(gram: tuple) -> float:
        if len(gram) == 1:
            return uni.get(gram, uni[("<unk>",)])
        history = gram[:-1]
        return gamma[len(history)].get(history, 1.0) * lower(gram[1:])

    for n in (2, 3):
        by_history: dict[tuple, list[tuple[tuple, int]]] = defaultdict(list)
        for gram, c in counts[n].items():
            by_history[gram[:-1]].append((gram, c))
        for history, grams in sorted(by_history.items()):
            h_total = sum(c for _, c in grams)
            left = D * len(grams) / h_total
            for gram, c in grams:
                probs[n][gram] = (c - D) / h_total + left * lower(gram[1:])
            # Back-off weight: the mass left, over the lower order's mass of unseen words.
            seen_lower = sum(lower(g[1:]) for g, _ in grams)
            gamma[n - 1][history] = (1 - sum(probs[n][g] for g, _ in grams)) / max(1e-12, 1 - seen_lower)
    out: dict[int, dict[tuple, tuple[float, float | None]]] = {}
    for n in (1, 2, 3):
        out[n] = {}
        for gram, p in sorted(probs[n].items()):
            bo = gamma.get(n, {}).get(gram) if n < 3 else None
            out[n][gram] = (math.log10(p), None if bo is None else math.log10(bo))
    return out


def write_arpa(path: Path, model: dict[int, dict[tuple, tuple[float, float | None]]]) -> None:
    """Write ``model`` in ARPA format (tab-separated, as KenLM and libime write it)."""
    lines = ["", "\\data\\"] + [f"ngram {n}={len(model[n])}" for n in (1, 2, 3)] + [""]
    for n in (1, 2, 3):
        lines.append(f"\\{n}-grams:")
        for gram, (p, bo) in model[n].items():
            row = f"{p:.6f}\t{' '.join(gram)}"
            if n < 3:
                row += f"\t{0.0 if bo is None else bo:.6f}"
            lines.append(row)
        lines.append("")
    lines.append("\\end\\")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


WORKS = {
    "全唐诗/poet.tang.0.json": [
        {"author": "李白", "title": "静夜思", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
        {"author": "孟浩然", "title": "春晓", "paragraphs": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]},
        {"author": "王之涣", "title": "登鹳雀楼", "paragraphs": ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]},
        {"author": "王维", "title": "相思", "paragraphs": ["红豆生南国，春来发几枝。", "愿君多采撷，此物最相思。"]},
        {"author": "贺知章", "title": "咏柳", "paragraphs": ["碧玉妆成一树高，万条垂下绿丝绦。", "不知细叶谁裁出，二月春风似剪刀。"]},
        {"author": "杜甫", "title": "绝句", "paragraphs": ["两个黄鹂鸣翠柳，一行白鹭上青天。", "窗含西岭千秋雪，门泊东吴万里船。"]},
        {"author": "李白", "title": "赠汪伦", "paragraphs": ["李白乘舟将欲行，忽闻岸上踏歌声。", "桃花潭水深千尺，不及汪伦送我情。"]},
        {"author": "王昌龄", "title": "出塞", "paragraphs": ["秦时明月汉时关，万里长征人未还。", "但使龙城飞将在，不教胡马度阴山。"]},
    ],
    "论语/lunyu.json": [
        {"chapter": "学而篇", "paragraphs": ["子曰：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？”"]},
    ],
}
LICENSE = ("The works in this folder are classical Chinese texts in the public domain, typed for this\n"
           "project's tests in the layout of the chinese-poetry collection (MIT).\n")


def main() -> None:
    """Write both fixtures."""
    LM_DIR.mkdir(parents=True, exist_ok=True)
    write_arpa(LM_DIR / "tiny.arpa", estimate(SENTENCES))
    (LM_DIR / "LICENSE").write_text("Apache-2.0, as the rest of fillmask-edge: written by "
                                    "tests/make_tiny_knowledge.py from its own sentences.\n", encoding="utf-8")
    (LM_DIR / "README.md").write_text("# tiny.arpa\n\nA word trigram LM of 22 short sentences, made by "
                                      "`tests/make_tiny_knowledge.py` for the tests.\n", encoding="utf-8")
    for name, records in WORKS.items():
        path = POETRY_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (POETRY_DIR / "LICENSE").write_text(LICENSE, encoding="utf-8")
    print(f"wrote {LM_DIR} and {POETRY_DIR}")


if __name__ == "__main__":
    main()
