"""Run ComfyUI workflows without ComfyUI: convert the UI (graph) format that ComfyUI saves into the API (prompt)
format that POST /prompt takes, and execute an API prompt with plain node classes.

    workflow = load_workflow("example_workflows/fluxcore_text_to_image.json")
    prompt = ui_to_api(workflow, specs_from_classes(classes), overrides={"steps": 2})
    result = run_prompt(prompt, classes)      # result.outputs[node_id] -> output tuple, result.ui[node_id]

UI format: `nodes` (id, type, mode, inputs [{name, type, link, widget?}], outputs, widgets_values) and `links`
([id, from_node, from_slot, to_node, to_slot, type], or objects in the newer schema). API format:
{"<id>": {"class_type": T, "inputs": {name: value | ["<from id>", from_slot]}}}.

How the saved widget values line up with a node's inputs: example_workflows/ui_format.py (what ComfyUI's
frontend does); values beyond the widget inputs (an upload button's "image", a refresh button) are ignored.
Frontend-only nodes are not executed: Note and MarkdownNote are dropped, links through Reroute nodes are
followed to their source, a PrimitiveNode's value is copied into the inputs it feeds; muted nodes (mode 2)
are dropped and bypassed nodes (mode 4) pass an input of the same type through.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from example_workflows.ui_format import combo_choices, widget_slots

NOTE_TYPES = {"Note", "MarkdownNote"}
FRONTEND_ONLY = NOTE_TYPES | {"Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASSED = 2, 4

InputTypes = Callable[[str], Mapping[str, Mapping[str, tuple]]]  # class_type -> INPUT_TYPES() dict


class WorkflowError(ValueError):
    """A workflow that cannot be converted or run; the message names the node."""


# ---------------------------------------------------------------- node specs
def specs_from_classes(classes: Mapping[str, type]) -> InputTypes:
    """INPUT_TYPES of node classes (ours, the stand-ins) by class_type."""
    def spec(class_type: str):
        if class_type not in classes:
            raise WorkflowError(f"unknown node type {class_type!r}")
        return classes[class_type].INPUT_TYPES()
    return spec


def specs_from_object_info(object_info: Mapping[str, Mapping]) -> InputTypes:
    """INPUT_TYPES as a ComfyUI server reports them in GET /object_info."""
    def spec(class_type: str):
        if class_type not in object_info:
            raise WorkflowError(f"unknown node type {class_type!r} (not in /object_info)")
        info = object_info[class_type]
        order = info.get("input_order") or {}
        out = {}
        for group, inputs in (info.get("input") or {}).items():
            names = order.get(group) or list(inputs)  # JSON objects keep their order, input_order says it anyway
            out[group] = {name: tuple(inputs[name]) for name in names if name in inputs}
        return out
    return spec


# ---------------------------------------------------------------- UI -> API
def load_workflow(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _links(workflow: Mapping) -> dict[int, tuple[int, int, int, int, str]]:
    """link id -> (from node, from slot, to node, to slot, type), for both link encodings."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, Mapping):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
        else:
            out[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return out


def node_types(workflow: Mapping) -> set[str]:
    """The node types a workflow executes (frontend-only nodes left out)."""
    return {n["type"] for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}


def _override_for(overrides, class_type: str, name: str):
    """(True, value) when `overrides` replaces this widget: {class_type: {input: value}} wins over {input: value}."""
    if overrides is None:
        return False, None
    if callable(overrides):
        return overrides(class_type, name)
    per_class = overrides.get(class_type)
    if isinstance(per_class, Mapping) and name in per_class:
        return True, per_class[name]
    if name in overrides and not isinstance(overrides[name], Mapping):
        return True, overrides[name]
    return False, None


def ui_to_api(workflow: Mapping, input_types: InputTypes, overrides=None) -> dict[str, dict]:
    """The API (prompt) form of a UI-format workflow.

    `overrides` replaces widget values that are not fed by a link: {"steps": 2} for every node with a "steps"
    widget, {"FluxCoreSampler": {"steps": 2}} for one class (wins), or f(class_type, name) -> (replace?, value).
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)

    def source(link_id, seen=()) -> tuple[str, Any]:
        """Where a link really comes from: ("link", [id, slot]), ("value", v) or ("none", None)."""
        if link_id in seen:
            raise WorkflowError(f"link {link_id} loops through reroutes or bypassed nodes")
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is used by a node but missing from 'links'")
        origin_id, origin_slot, _, _, link_type = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} comes from node {origin_id}, which is not in the workflow")
        kind, mode = origin["type"], origin.get("mode", 0)
        if kind == "Reroute" or mode == MODE_BYPASSED:
            ins = origin.get("inputs") or []
            if kind == "Reroute":
                through = [i for i in ins if i.get("link") is not None]
            else:  # a bypassed node passes through an input of the output's type, the same slot first
                ordered = ([ins[origin_slot]] if origin_slot < len(ins) else []) + ins
                through = [i for i in ordered if i.get("link") is not None and i.get("type") == link_type]
            return source(through[0]["link"], seen + (link_id,)) if through else ("none", None)
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            return ("value", values[0]) if values else ("none", None)
        if mode == MODE_MUTED:
            return "none", None
        return "link", [str(origin_id), origin_slot]

    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        class_type = node["type"]
        if class_type in FRONTEND_ONLY or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        spec = input_types(class_type)
        slots = widget_slots(spec)
        values = node.get("widgets_values")
        inputs: dict[str, Any] = {}
        if isinstance(values, Mapping):  # some custom nodes save widgets by name
            inputs.update({name: values[name] for name, _ in slots if name in values})
        else:
            values, i = list(values or []), 0
            for name, extra in slots:
                if i >= len(values):
                    break
                inputs[name] = values[i]
                i += 1 + extra
        for name, _ in slots:
            replace, value = _override_for(overrides, class_type, name)
            if replace:
                inputs[name] = value
        for socket in node.get("inputs") or []:
            if socket.get("link") is None:
                continue
            name = (socket.get("widget") or {}).get("name") or socket["name"]
            kind, value = source(socket["link"])
            if kind == "none":
                inputs.pop(name, None)
            else:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or class_type}}
    return prompt


# ---------------------------------------------------------------- running an API prompt
def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def output_nodes(prompt: Mapping, classes: Mapping[str, type]) -> list[str]:
    return [nid for nid, n in prompt.items() if getattr(classes.get(n["class_type"]), "OUTPUT_NODE", False)]


def execution_order(prompt: Mapping, targets: list[str]) -> list[str]:
    """The targets and everything they need, each after its inputs (like ComfyUI: nothing else runs)."""
    order, state = [], {}

    def visit(nid: str, path: tuple):
        if state.get(nid) == "done":
            return
        if nid in path:
            raise WorkflowError(f"the workflow has a cycle through node {nid}")
        if nid not in prompt:
            raise WorkflowError(f"node {path[-1]} takes an input from node {nid}, which is not in the prompt")
        for value in prompt[nid]["inputs"].values():
            if is_link(value):
                visit(value[0], path + (nid,))
        state[nid] = "done"
        order.append(nid)

    for nid in targets:
        visit(nid, ())
    return order


def validate(prompt: Mapping, classes: Mapping[str, type]) -> None:
    """What ComfyUI checks before it queues a prompt, in short: known types, required inputs present, combo
    values among the choices, links to an existing output slot."""
    for nid, node in prompt.items():
        cls = classes.get(node["class_type"])
        where = f"node {nid} ({node['class_type']})"
        if cls is None:
            raise WorkflowError(f"{where}: unknown node type")
        spec = cls.INPUT_TYPES()
        for name in spec.get("required") or {}:
            if name not in node["inputs"]:
                raise WorkflowError(f"{where}: required input {name!r} is missing")
        for name, value in node["inputs"].items():
            if is_link(value):
                src_cls = classes.get((prompt.get(value[0]) or {}).get("class_type"))
                if src_cls is None or value[1] >= len(src_cls.RETURN_TYPES):
                    raise WorkflowError(f"{where}, input {name!r}: no output {value[1]} on node {value[0]}")
                continue
            choices = combo_choices(spec, name)
            if choices is not None and value not in choices:
                raise WorkflowError(f"{where}, input {name!r}: {value!r} is not one of {choices[:8]}")


@dataclass
class RunResult:
    outputs: dict[str, tuple] = field(default_factory=dict)  # node id -> the node's output tuple
    ui: dict[str, dict] = field(default_factory=dict)        # node id -> its "ui" dict (SaveImage's images)


def run_prompt(prompt: Mapping, classes: Mapping[str, type], check: bool = True) -> RunResult:
    """Executes the prompt's output nodes and what they need, calling each class's FUNCTION with its inputs."""
    if check:
        validate(prompt, classes)
    targets = output_nodes(prompt, classes)
    if not targets:
        raise WorkflowError("the prompt has no output node (e.g. SaveImage), so nothing would run")
    result = RunResult()
    for nid in execution_order(prompt, targets):
        node = prompt[nid]
        cls = classes[node["class_type"]]
        if getattr(cls, "INPUT_IS_LIST", False) or any(getattr(cls, "OUTPUT_IS_LIST", ()) or ()):
            raise WorkflowError(f"node {nid} ({node['class_type']}): list inputs/outputs are not supported here")
        kwargs = {name: result.outputs[value[0]][value[1]] if is_link(value) else value
                  for name, value in node["inputs"].items()}
        for name, kind in (cls.INPUT_TYPES().get("hidden") or {}).items():
            kwargs[name] = {"PROMPT": dict(prompt), "UNIQUE_ID": nid}.get(kind)
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, Mapping):
            result.ui[nid] = out.get("ui") or {}
            out = out.get("result") or ()
        result.outputs[nid] = tuple(out)
    return result
