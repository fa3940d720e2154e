"""The serial front end's protocol: what one input line asks for, and the lines that answer it.

- ``terminal`` mode (a person): ``?``/``help``/``帮助``, ``info`` and ``top N`` are
  commands; any other line is a query, answered as a table (:mod:`edge.serial_render`);
  a problem is one ``错误：…`` line.
- ``line`` mode (a program): a plain sentence or a JSON object ``{"text": ...,
  "top_k": ..., "blank_length": ..., "id": ...}``; the answer is one line of JSON, the
  HTTP API's response or ``{"error": ..., "message": ...}``, with the request's ``id``
  echoed.

No I/O here: :class:`edge.serial_terminal.SerialTerminal` reads lines off the port
(:mod:`edge.serial_input`), hands each to :meth:`SerialProtocol.answer` and writes the
lines it returns.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from edge.serial_input import Line
from edge.serial_render import HELP_TEXT, error_message, format_answer

LOG = logging.getLogger("edge.serial")


class SerialProtocol:
    """Answers completed input lines with ``engine`` in one of the two modes.

    ``engine`` is anything with ``predict(text, top_k=, blank_length=)`` and ``info()``;
    ``top_k`` and ``blank_length`` are the defaults a line may override (a person with
    ``top N``, a program in its JSON); ``max_line`` is named in the too-long message.
    """

    def __init__(self, engine: Any, mode: str, top_k: int, blank_length: int | str | None, max_line: int):
        self.engine = engine
        self.mode = mode
        self.top_k = top_k
        self.blank_length = blank_length
        self.max_line = max_line
        self.lines_served = 0

    def answer(self, line: Line) -> list[str]:
        """The lines to write back for one completed input line, without line ends
        (none for a blank or cancelled line)."""
        if self.mode == "terminal":
            return self._terminal_line(line)
        return self._program_line(line)

    def model_info(self) -> dict[str, Any]:
        """The engine's ``info()``, or ``{}`` when it fails (it is only shown, never needed)."""
        try:
            return dict(self.engine.info())
        except Exception:  # the banner is cosmetic; never let it kill the session
            LOG.exception("engine.info() failed")
            return {}

    def _terminal_line(self, line: Line) -> list[str]:
        if line.error == "cancelled":
            return []
        if line.error:
            return ["错误：" + error_message(line.error, limit=self.max_line)]
        text = line.text.strip()
        if not text:
            return []
        command = text.lower()
        if command in ("?", "？", "help", "帮助"):
            return HELP_TEXT.format(top_k=self.top_k).splitlines()
        if command == "info":
            info = self.model_info()
            return [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in info.items()]
        if command.startswith("top ") or command.startswith("top\t"):
            return self._set_top_k(command[4:].strip())
        result = self._predict(text, self.top_k, self.blank_length)
        if "error" in result:
            return ["错误：" + str(result["message"])]
        return format_answer(text, result)

    def _set_top_k(self, value: str) -> list[str]:
        try:
            top_k = int(value)
            if top_k < 1:
                raise ValueError
        except ValueError:
            return [f"错误：top 后面要跟一个正整数，例如 top 3（收到 {value!r}）"]
        self.top_k = top_k
        return [f"每个空显示 {top_k} 个候选"]

    def _program_line(self, line: Line) -> list[str]:
        if line.error:
            return _json_line({"error": line.error, "message": error_message(line.error, limit=self.max_line)})
        raw = line.text.strip()
        if not raw:
            return []  # blank lines are keep-alives, not queries
        request_id = None
        if raw.startswith("{"):
            try:
                request = json.loads(raw)
            except json.JSONDecodeError as exc:
                return _json_line({"error": "invalid_json", "message": error_message("invalid_json", str(exc))})
            request_id = request.get("id")
            problem = _check_request(request)
            if problem:
                return _json_line(_with_id({"error": "bad_request", "message": problem}, request_id))
            top_k = request.get("top_k")
            blank_length = request.get("blank_length")
            result = self._predict(request["text"], self.top_k if top_k is None else top_k,
                                   self.blank_length if blank_length is None else blank_length)
        else:
            result = self._predict(raw, self.top_k, self.blank_length)
        return _json_line(_with_id(result, request_id))

    def _predict(self, text: str, top_k: Any, blank_length: Any) -> dict[str, Any]:
        """Run one query; return the engine's answer or an error dict."""
        self.lines_served += 1
        try:
            return self.engine.predict(text, top_k=top_k, blank_length=blank_length)
        except ValueError as exc:
            code = getattr(exc, "code", None)  # edge.engine.InputError carries a code
            if code:
                return {"error": code, "message": _exception_message(exc)}
            LOG.exception("engine rejected %r without an error code", text)
        except Exception:
            LOG.exception("engine failed on %r", text)
        return {"error": "internal_error", "message": error_message("internal_error")}


def _json_line(obj: dict[str, Any]) -> list[str]:
    """One answer line of JSON (UTF-8 text as is, not escaped)."""
    return [json.dumps(obj, ensure_ascii=False)]


def _exception_message(exc: Exception) -> str:
    """The human part of an InputError(code, message), however it stores it."""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        return message
    if len(exc.args) == 2 and isinstance(exc.args[1], str):
        return exc.args[1]
    return str(exc)


def _check_request(request: Any) -> str | None:
    """Return what is wrong with a JSON request line, or None."""
    if not isinstance(request, dict):
        return 'a JSON line must be an object such as {"text": "…[MASK]…", "top_k": 5}'
    if not isinstance(request.get("text"), str):
        return 'the JSON object needs a "text" string'
    top_k = request.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        return '"top_k" must be an integer'
    return None


def _with_id(obj: dict[str, Any], request_id: Any) -> dict[str, Any]:
    """Echo a request's "id" into its answer so a program can match them."""
    if request_id is None:
        return obj
    return {**obj, "id": request_id}
