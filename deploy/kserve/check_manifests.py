"""Check the KServe manifests against the kserve SDK's own models of the resources (the fields of
ServingRuntime, InferenceService and the Kubernetes objects inside them), key by key.

    pip install kserve   # in a venv of its own, with a constraints file holding torch==2.13.0
    python deploy/kserve/check_manifests.py

Every key must be a field of the model at its place (camelCase, as KServe's CRDs spell them);
values must have the field's JSON type. A field KServe does not know fails here, where
``kubectl apply`` would drop it or reject it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import kserve
import kubernetes.client
import yaml

HERE = Path(__file__).resolve().parent
KINDS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def model_class(name: str):
    return getattr(kserve, name, None) or getattr(kubernetes.client, name)


def check(value, type_name: str, where: str, problems: list[str]) -> None:
    if type_name in SCALARS:
        if not isinstance(value, SCALARS[type_name]):
            problems.append(f"{where}: expected {type_name}, got {type(value).__name__}")
        return
    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list")
            return
        for i, item in enumerate(value):
            check(item, m[1], f"{where}[{i}]", problems)
        return
    if m := re.fullmatch(r"[Dd]ict[(\[]str, (.+)[)\]]", type_name):
        for key, item in (value or {}).items():
            check(item, m[1], f"{where}.{key}", problems)
        return
    if type_name in ("V1ObjectMeta",):  # free-form metadata: name, annotations, labels
        return
    cls = model_class(type_name)
    if not isinstance(value, dict):
        problems.append(f"{where}: expected an object ({type_name})")
        return
    fields = {json_name: cls.openapi_types[attr] for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: not a field of {type_name}")
        else:
            check(item, fields[key], f"{where}.{key}", problems)


def main() -> int:
    problems: list[str] = []
    for path in sorted(HERE.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            check(document, KINDS[document["kind"]], f"{path.name}:{document['kind']}", problems)
    print("\n".join(problems) or f"ok: {', '.join(p.name for p in sorted(HERE.glob('*.yaml')))} use only known fields")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
