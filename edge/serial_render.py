"""What the serial terminal shows a person: an answer as a table with confidence bars, the
sentence with its best fillers, the quote, and this front end's own messages (CJK-aware
column widths). No I/O here; :mod:`edge.serial_terminal` writes these lines to the port."""

from __future__ import annotations

import unicodedata
from typing import Any

from edge.blanks import find_blanks
from edge.quotes import quote_line

DEFAULT_MAX_LINE = 1000  # characters; bounds memory, the engine has its own length limit
LOW_CONFIDENCE_HINT = "上下文信息不足，建议补充更多背景"
BAR_WIDTH = 20

# Errors this front end raises itself (the engine's InputError codes pass through).
MESSAGES = {
    "invalid_utf8": "这一行含有无效的 UTF-8 字节，请用 UTF-8 编码发送 (line is not valid UTF-8)",
    "line_too_long": "这一行超过 {limit} 个字符，已丢弃 (line longer than {limit} characters)",
    "invalid_json": "JSON 无法解析：{detail} (line starts with '{{' but is not valid JSON)",
    "bad_request": "{detail}",
    "internal_error": "内部错误，请查看服务日志 (internal error, see the service log)",
}

HELP_TEXT = """\
输入一个含有空格标记 [MASK] 的句子，回车后得到最可能的填空及其置信度。
  例：床前明月光，疑是地[MASK]霜。
  连续几个 [MASK] 组成一个词的空：今天天气很[MASK][MASK]。
命令：
  ? 或 help   显示本帮助
  info        模型信息
  top N       每个空显示 N 个候选（当前 {top_k}）
编辑：退格键删除一个字，Ctrl-U 清空本行，Ctrl-C 取消本行。"""


def char_width(char: str) -> int:
    """Return how many terminal columns ``char`` takes (CJK: 2, combining: 0)."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _pad(text: str, columns: int) -> str:
    """Pad ``text`` with spaces to ``columns`` terminal columns (CJK-aware)."""
    width = sum(char_width(c) for c in text)
    return text + " " * max(0, columns - width)


def format_answer(text: str, result: dict[str, Any]) -> list[str]:
    """Render an engine answer as terminal lines: per blank, candidates with bars."""
    lines: list[str] = []
    model = result.get("model") or {}
    if model.get("random_init"):
        lines.append("!! 警告：模型权重是随机初始化的，只能测速，答案没有意义 (random weights)")
    blanks = result.get("blanks") or []
    filled = fill_best(text, blanks)
    if filled is not None:
        lines.append(f"=> {filled}")
    for number, blank in enumerate(blanks, 1):
        if len(blanks) > 1:
            lines.append(f"空 {number}（第 {blank['start'] + 1} 字）：")
        candidates = blank.get("candidates") or []
        columns = max([sum(char_width(c) for c in cand["text"]) for cand in candidates] + [2])
        for rank, cand in enumerate(candidates, 1):
            score = float(cand["score"])
            filled_cells = round(max(0.0, min(1.0, score)) * BAR_WIDTH)
            bar = "#" * filled_cells + "." * (BAR_WIDTH - filled_cells)
            lines.append(f"  {rank}. {_pad(cand['text'], columns)}  [{bar}] {score * 100:5.1f}%")
        quote = quote_line(candidates[0]) if candidates else None
        if quote:
            lines.append(f"  出处：{quote}")
        if blank.get("low_confidence"):
            lines.append(f"  ! {blank.get('hint') or LOW_CONFIDENCE_HINT}")
    footer = f"用时 {float(result.get('elapsed_ms', 0.0)):.1f} ms"
    if result.get("cached"):
        footer += "（缓存）"
    if result.get("truncated"):
        footer += "；输入过长，已截断"
    lines.append(footer)
    return lines


def fill_best(text: str, blanks: list[dict[str, Any]]) -> str | None:
    """Return ``text`` with each blank's best candidate in 【】, or None if a blank is not found.

    ``start`` in the answer is where the blank's mask run begins; ``length`` is the
    filler's length, so the run's end is found again with the engine's own pattern.
    """
    runs = {blank.start: blank.end for blank in find_blanks(text)[1]}
    filled = text
    # Fill from the last blank backwards so earlier offsets stay valid.
    for blank in sorted(blanks, key=lambda b: b["start"], reverse=True):
        end = runs.get(blank["start"])
        if end is None or not blank.get("candidates"):
            return None
        filled = filled[: blank["start"]] + f"【{blank['candidates'][0]['text']}】" + filled[end:]
    return filled if blanks else None


def error_message(code: str, detail: str = "", limit: int = DEFAULT_MAX_LINE) -> str:
    """Return the message for one of this front end's own error codes."""
    return MESSAGES[code].format(detail=detail, limit=limit)
