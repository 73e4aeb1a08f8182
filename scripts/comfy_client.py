"""A small client for a running ComfyUI server, and the UI-to-API workflow converter.

``ui_to_api(ui_workflow, object_info)`` turns a workflow as the ComfyUI front end saves it (nodes with
``widgets_values``, a ``links`` table) into the API prompt that ``POST /prompt`` runs, the way the front
end's own "queue" step does it:

* widget values are matched to the node's widget inputs in ``/object_info`` order (``input_order``:
  required, then optional). Widget inputs are those of type INT, FLOAT, STRING, BOOLEAN or COMBO (a list
  of options, or ``"COMBO"``), or with a ``widgetType`` of these, unless ``forceInput`` is set. An INT with
  ``control_after_generate`` (or, when that key is absent, named ``seed``/``noise_seed``) is followed by
  one control value ("randomize", "fixed", ...); a COMBO with ``control_after_generate`` by two (control
  and filter). Those are skipped, as are trailing extras such as an upload button's value.
  ``widgets_values`` given as a dict (some video nodes) is read by input name.
* links become ``[str(origin_node_id), origin_slot]``; a linked widget input takes the link.
* Note, MarkdownNote, Reroute and PrimitiveNode exist only in the UI: reroutes are followed to their
  source, a PrimitiveNode's value is written into the widgets it feeds, notes are dropped.
* muted nodes (mode 2) are dropped with every input that refers to them; bypassed nodes (mode 4) are
  dropped and each consumer of one of their outputs is wired to the bypassed node's input of the
  matching type instead (same slot index first, as the front end does).

Client functions use only the standard library: ``object_info``, ``queue_prompt``, ``wait_for_result``,
``interrupt``, ``cancel_prompt``, ``system_stats``. ``queue_prompt`` fails with every node error (node, input,
ComfyUI's message) also when the server accepts a prompt but would skip the nodes it rejected.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Iterable

# Node types that the front end defines for itself; the server has no such nodes.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
VIRTUAL_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}

MODE_ALWAYS = 0
MODE_MUTED = 2  # "never": not executed, and inputs fed by it are removed
MODE_BYPASS = 4

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")


class ComfyError(RuntimeError):
    """The server rejected a prompt or reported an error while running it."""


class PromptRejected(ComfyError):
    """``POST /prompt`` answered 400; the message carries the server's error and node_errors."""

    def __init__(self, message: str, response: dict | None = None):
        super().__init__(message)
        self.response = response or {}


class ExecutionFailed(ComfyError):
    """The prompt ran and failed (or was interrupted); the message carries the server's exception text."""

    def __init__(self, message: str, history_entry: dict | None = None):
        super().__init__(message)
        self.history_entry = history_entry or {}


class WorkflowError(ValueError):
    """A UI workflow cannot be converted (unknown node type, widget count mismatch, broken link)."""


# ----------------------------------------------------------------------------------------------------
# Widget layout from /object_info
# ----------------------------------------------------------------------------------------------------

def _spec_type_and_options(spec: Any) -> tuple[Any, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        raise WorkflowError(f"input spec {spec!r} is not [type, options]")
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], options


def widget_kind(spec: Any) -> str | None:
    """The widget type ("INT", "COMBO", ...) an input spec from /object_info shows as, or None for a socket."""
    io_type, options = _spec_type_and_options(spec)
    if options.get("forceInput"):
        return None
    kind = options.get("widgetType", io_type)
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return kind if kind in WIDGET_TYPES else None


def control_value_count(name: str, spec: Any) -> int:
    """How many front-end-only values follow this widget's value in ``widgets_values``."""
    kind = widget_kind(spec)
    _, options = _spec_type_and_options(spec)
    control = options.get("control_after_generate")
    if kind == "INT":
        if control is None:  # front-end convention for nodes that predate the option
            control = name in SEED_NAMES
        return 1 if control else 0
    if kind == "COMBO" and control:
        return 2  # the control mode and its filter list
    return 0


def ordered_inputs(node_info: dict) -> list[tuple[str, Any]]:
    """(name, spec) of a node's required then optional inputs, in /object_info's ``input_order``."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {}
    result = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = list(order.get(section) or specs.keys())
        names += [name for name in specs if name not in names]
        result += [(name, specs[name]) for name in names if name in specs]
    return result


def widget_layout(node_info: dict) -> list[tuple[str, int]]:
    """(widget input name, number of control values after it) in ``widgets_values`` order."""
    return [(name, control_value_count(name, spec))
            for name, spec in ordered_inputs(node_info) if widget_kind(spec) is not None]


def map_widget_values(node_type: str, node_id: Any, node_info: dict, widgets_values: Any) -> dict[str, Any]:
    """Widget input name -> value for one node, skipping the front end's control values."""
    layout = widget_layout(node_info)
    if widgets_values is None:
        widgets_values = []
    if isinstance(widgets_values, dict):
        names = {name for name, _ in layout} | {name for name, _ in ordered_inputs(node_info)}
        return {name: value for name, value in widgets_values.items() if name in names}
    if not isinstance(widgets_values, list):
        raise WorkflowError(f"node {node_id} ({node_type}): widgets_values must be a list or a dict, "
                            f"got {type(widgets_values).__name__}")
    needed = sum(1 + extra for _, extra in layout)
    if len(widgets_values) < needed:
        expected = ", ".join(name + (f" (+{extra} control)" if extra else "") for name, extra in layout)
        raise WorkflowError(
            f"node {node_id} ({node_type}) has {len(widgets_values)} widgets_values {widgets_values!r}, "
            f"the server's {node_type} needs {needed}: {expected}. Re-save the workflow with this "
            f"ComfyUI version or fix the values")
    values = {}
    position = 0
    for name, extra in layout:
        values[name] = widgets_values[position]
        position += 1 + extra
    return values


# ----------------------------------------------------------------------------------------------------
# Graph
# ----------------------------------------------------------------------------------------------------

def _links_by_id(ui_workflow: dict) -> dict[int, dict]:
    """Link id -> {origin_id, origin_slot, target_id, target_slot, type}, from either link format."""
    links = {}
    for link in ui_workflow.get("links") or []:
        if isinstance(link, dict):
            entry = {key: link.get(key) for key in ("id", "origin_id", "origin_slot", "target_id",
                                                     "target_slot", "type")}
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            entry = dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
        else:
            raise WorkflowError(f"link {link!r} is neither [id, from, from_slot, to, to_slot, type] nor a dict")
        links[entry["id"]] = entry
    return links


def _types_compatible(a: Any, b: Any) -> bool:
    """The front end's connection rule: equal, a wildcard, or overlapping comma-separated type lists."""
    if a in ("*", "", None, 0) or b in ("*", "", None, 0):
        return True
    left = {t.strip().upper() for t in str(a).split(",")}
    right = {t.strip().upper() for t in str(b).split(",")}
    return bool(left & right)


def _bypass_input_index(node: dict, slot: int, wanted_type: Any) -> int:
    """Which input of a bypassed node stands in for its output ``slot`` (the front end's choice)."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    output_type = outputs[slot].get("type") if slot < len(outputs) else wanted_type
    if wanted_type in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and _types_compatible(inputs[slot].get("type"), output_type) \
            and _types_compatible(inputs[slot].get("type"), wanted_type):
        return slot
    for index, candidate in enumerate(inputs):
        if candidate.get("type") == wanted_type:
            return index
    for index, candidate in enumerate(inputs):
        if _types_compatible(candidate.get("type"), output_type) and \
                _types_compatible(candidate.get("type"), wanted_type):
            return index
    return -1


class _Resolver:
    """Follows a link back through reroutes and bypassed nodes to a real output or a primitive value."""

    def __init__(self, nodes: dict[str, dict], links: dict[int, dict]):
        self.nodes = nodes
        self.links = links

    def input_source(self, node: dict, input_index: int, wanted_type: Any, seen: set) -> tuple | None:
        inputs = node.get("inputs") or []
        if input_index >= len(inputs):
            raise WorkflowError(f"node {node.get('id')} ({node.get('type')}) has no input {input_index}")
        link_id = inputs[input_index].get("link")
        if link_id is None:
            return None
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"node {node.get('id')} ({node.get('type')}) input "
                                f"{inputs[input_index].get('name')!r} refers to missing link {link_id}")
        wanted = wanted_type if wanted_type is not None else inputs[input_index].get("type")
        return self.output_source(str(link["origin_id"]), int(link["origin_slot"]), wanted, seen)

    def output_source(self, node_id: str, slot: int, wanted_type: Any, seen: set) -> tuple | None:
        """("link", node_id, slot) | ("value", value) | None when nothing comes out."""
        key = (node_id, slot)
        if key in seen:
            raise WorkflowError(f"links loop through node {node_id} output {slot}")
        seen = seen | {key}
        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowError(f"a link comes from node {node_id}, which is not in the workflow")
        node_type = node.get("type")
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS and node_type not in VIRTUAL_TYPES:
            index = _bypass_input_index(node, slot, wanted_type)
            return None if index < 0 else self.input_source(node, index, wanted_type, seen)
        if node_type == REROUTE_TYPE:
            return self.input_source(node, 0, wanted_type, seen)
        if node_type == PRIMITIVE_TYPE:
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node_type in NOTE_TYPES:
            return None
        return ("link", node_id, slot)


def _api_value(value: Any) -> Any:
    # A list in an API prompt means a link; list-valued widgets travel wrapped, as the front end sends them.
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow to an API prompt ``{node_id: {"class_type", "inputs", "_meta"}}``.

    ``object_info`` is the server's ``GET /object_info`` answer (at least every node type used).
    Raises WorkflowError naming the node when a type is unknown, a link is broken or widgets_values is short.
    """
    if not isinstance(ui_workflow, dict) or "nodes" not in ui_workflow:
        raise WorkflowError("ui_workflow must be a UI-format workflow dict with 'nodes' and 'links'; "
                            "an API prompt (node id -> class_type/inputs) needs no conversion")
    if ui_workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported; unpack the subgraphs first")
    nodes = {str(node["id"]): node for node in ui_workflow["nodes"]}
    resolver = _Resolver(nodes, _links_by_id(ui_workflow))

    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items(), key=lambda item: _id_sort_key(item[0])):
        node_type = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if node_type in VIRTUAL_TYPES or mode in (MODE_MUTED, MODE_BYPASS):
            continue
        node_info = object_info.get(node_type)
        if node_info is None:
            raise WorkflowError(f"node {node_id} has type {node_type!r}, which the server does not know "
                                f"(is its custom node pack installed and importable?)")
        inputs = {name: _api_value(value) for name, value in
                  map_widget_values(node_type, node_id, node_info, node.get("widgets_values")).items()}
        for index, slot in enumerate(node.get("inputs") or []):
            name = (slot.get("widget") or {}).get("name") or slot.get("name")
            source = resolver.input_source(node, index, None, set())
            if source is None:
                continue
            if source[0] == "value":
                inputs[name] = _api_value(source[1])
            else:
                inputs[name] = [source[1], source[2]]
        title = node.get("title") or node_info.get("display_name") or node_type
        prompt[node_id] = {"inputs": inputs, "class_type": node_type, "_meta": {"title": title}}

    # Inputs fed by muted nodes (kept above as links) go, as the front end drops them.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _id_sort_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# ----------------------------------------------------------------------------------------------------
# HTTP client
# ----------------------------------------------------------------------------------------------------

def _request(url: str, data: dict | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def object_info(url: str, node_type: str | None = None, timeout: float = 60.0) -> dict:
    """``GET /object_info`` (or ``/object_info/<node_type>``): the server's node definitions."""
    path = "/object_info" + (f"/{urllib.parse.quote(node_type)}" if node_type else "")
    status, payload = _request(url.rstrip("/") + path, timeout=timeout)
    if status != 200 or not isinstance(payload, dict):
        raise ComfyError(f"GET {path} answered {status}: {str(payload)[:500]}")
    return payload


def system_stats(url: str, timeout: float = 10.0) -> dict:
    """``GET /system_stats``: versions, devices, memory."""
    status, payload = _request(url.rstrip("/") + "/system_stats", timeout=timeout)
    if status != 200 or not isinstance(payload, dict):
        raise ComfyError(f"GET /system_stats answered {status}: {str(payload)[:500]}")
    return payload


def _node_label(node_id: str, class_type: str, prompt: dict | None) -> str:
    title = ((prompt or {}).get(node_id) or {}).get("_meta", {}).get("title")
    if title and title != class_type:
        return f"node {node_id} '{title}' ({class_type})"
    return f"node {node_id} ({class_type})"


def node_error_lines(node_errors: dict | None, prompt: dict | None = None) -> list[str]:
    """One line per rejected input: the node (id, title, type), the input and ComfyUI's message."""
    lines = []
    for node_id, node_error in (node_errors or {}).items():
        label = _node_label(str(node_id), node_error.get("class_type", "?"), prompt)
        for item in node_error.get("errors", []):
            input_name = (item.get("extra_info", {}) or {}).get("input_name")
            where = f" input {input_name!r}" if input_name else ""
            details = str(item.get("details", "") or "")
            if input_name and details.startswith(f"{input_name} - "):
                details = details[len(input_name) + 3:]  # custom validation: "name - message"
            elif details == input_name:
                details = ""
            lines.append(f"{label}{where}: {item.get('message', '')}" + (f": {details}" if details else ""))
    return lines


def format_prompt_errors(response: Any, prompt: dict | None = None) -> str:
    """A readable text of an answer to ``POST /prompt`` with errors (its error and every node error)."""
    if not isinstance(response, dict):
        return str(response)
    lines = []
    error = response.get("error")
    if isinstance(error, dict):
        lines.append(f"{error.get('type', 'error')}: {error.get('message', '')} {error.get('details', '')}".strip())
    elif error:
        lines.append(str(error))
    lines += node_error_lines(response.get("node_errors"), prompt)
    return "\n".join(lines) or json.dumps(response)


def cancel_prompt(url: str, prompt_id: str, timeout: float = 30.0) -> None:
    """Take a queued prompt off the queue, and interrupt it if it already started."""
    _request(url.rstrip("/") + "/queue", {"delete": [prompt_id]}, timeout=timeout)
    _request(url.rstrip("/") + "/interrupt", {"prompt_id": prompt_id}, timeout=timeout)


def queue_prompt(url: str, api_prompt: dict, client_id: str | None = None, timeout: float = 60.0) -> str:
    """``POST /prompt``; returns the prompt id.

    Raises PromptRejected with every node error (node, input, ComfyUI's message) when the server refuses the
    prompt (400), and also when it accepts it with ``node_errors``: ComfyUI then runs only the outputs whose
    nodes are valid and skips the rest, so a run would look successful without doing what was asked; the
    queued prompt is cancelled first.
    """
    payload = {"prompt": api_prompt, "client_id": client_id or uuid.uuid4().hex}
    status, response = _request(url.rstrip("/") + "/prompt", payload, timeout=timeout)
    if status != 200:
        raise PromptRejected(f"the server rejected the prompt ({status}):\n"
                             f"{format_prompt_errors(response, api_prompt)}",
                             response if isinstance(response, dict) else None)
    if not isinstance(response, dict) or "prompt_id" not in response:
        raise ComfyError(f"POST /prompt answered without a prompt_id: {response!r}")
    if response.get("node_errors"):
        cancel_prompt(url, response["prompt_id"])
        raise PromptRejected("the server would skip nodes whose inputs it rejected, so the prompt was cancelled:\n"
                             + "\n".join(node_error_lines(response["node_errors"], api_prompt)), response)
    return response["prompt_id"]


def _execution_error_text(entry: dict) -> str:
    messages = (entry.get("status") or {}).get("messages") or []
    for kind, data in messages:
        if kind == "execution_error":
            trace = "".join(data.get("traceback") or [])
            return (f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                    f"{data.get('exception_type')}: {data.get('exception_message')}"
                    + (f"\n{trace}" if trace else ""))
        if kind == "execution_interrupted":
            return f"execution was interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"execution failed: {json.dumps(entry.get('status'))}"


def wait_for_result(url: str, prompt_id: str, timeout: float = 300.0, poll_interval: float = 0.25,
                    is_alive=None) -> dict:
    """Poll ``/history/<prompt_id>`` until the prompt finished; returns its history entry.

    Raises ExecutionFailed with the exception message when it failed or was interrupted, and
    TimeoutError after ``timeout`` s. ``is_alive`` (optional callable) lets the wait end early with a
    ComfyError when the server process has died.
    """
    deadline = time.monotonic() + timeout
    history_url = url.rstrip("/") + f"/history/{urllib.parse.quote(prompt_id)}"
    while True:
        status, payload = _request(history_url, timeout=30.0)
        entry = payload.get(prompt_id) if status == 200 and isinstance(payload, dict) else None
        if entry is not None:
            run_status = entry.get("status") or {}
            if run_status.get("status_str") == "error":
                raise ExecutionFailed(_execution_error_text(entry), entry)
            if run_status.get("completed", True):
                return entry
        if is_alive is not None and not is_alive():
            raise ComfyError(f"the server at {url} stopped while prompt {prompt_id} was running")
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
        time.sleep(poll_interval)


def interrupt(url: str, prompt_id: str | None = None, timeout: float = 30.0) -> None:
    """``POST /interrupt``: stop the running prompt (only ``prompt_id`` when given)."""
    payload = {"prompt_id": prompt_id} if prompt_id else {}
    status, response = _request(url.rstrip("/") + "/interrupt", payload, timeout=timeout)
    if status != 200:
        raise ComfyError(f"POST /interrupt answered {status}: {response!r}")


def output_files(history_entry: dict, kinds: Iterable[str] = ("images", "gifs", "videos", "audio")) -> list[dict]:
    """Every file record ({filename, subfolder, type}) in a history entry's node outputs."""
    files = []
    for node_output in (history_entry.get("outputs") or {}).values():
        for kind in kinds:
            files += [item for item in node_output.get(kind) or [] if isinstance(item, dict)]
    return files


def run_prompt(url: str, api_prompt: dict, timeout: float = 300.0, is_alive=None) -> dict:
    """Queue a prompt and wait for it; returns its history entry."""
    return wait_for_result(url, queue_prompt(url, api_prompt), timeout=timeout, is_alive=is_alive)
