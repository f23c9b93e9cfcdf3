"""Check a KServe manifest against KServe's own API models (the `kserve` package's generated classes for its
CRDs, and the Kubernetes client's for the pod fields they embed), strictly: every field must be one the model
declares, with the declared type, recursively; then KServe's client builds the object from it. Runs in KServe's
client venv; prints the problems and exits 1, or prints "ok".

    .venv-kserve/bin/python kserve_schema.py FILE.yaml
"""

import re
import sys

import kserve
import kserve.models as kserve_models
import kubernetes.client.models as k8s_models
import yaml

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


# the generated models spell containers either way: list[X] / dict(str, X) (KServe), List[X] / Dict[str, X]
LIST = re.compile(r"[lL]ist\[(.+)\]")
MAPPING = re.compile(r"dict\(\w+, (.+)\)|Dict\[\w+, (.+)\]")


def check(value, type_name: str, path: str, problems: list[str]) -> None:
    listed, mapping = LIST.fullmatch(type_name), MAPPING.fullmatch(type_name)
    if listed:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list ({type_name})")
            return
        for i, item in enumerate(value):
            check(item, listed.group(1), f"{path}[{i}]", problems)
        return
    if mapping:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping ({type_name})")
            return
        for key, item in value.items():
            check(item, mapping.group(1) or mapping.group(2), f"{path}.{key}", problems)
        return
    if type_name in PRIMITIVES:
        expected = PRIMITIVES[type_name]
        if not isinstance(value, expected) or (type_name == "int" and isinstance(value, bool)):
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__}")
        return
    model = getattr(kserve_models, type_name, None) or getattr(k8s_models, type_name, None)
    if model is None:
        problems.append(f"{path}: unknown model type {type_name}")
        return
    if not isinstance(value, dict):
        problems.append(f"{path}: expected an object ({type_name})")
        return
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{path}.{key}: not a field of {type_name}")
        else:
            check(item, model.openapi_types[fields[key]], f"{path}.{key}", problems)


if __name__ == "__main__":
    doc = yaml.safe_load(open(sys.argv[1]))
    problems: list[str] = []
    check(doc, "V1beta1InferenceService", doc.get("kind", "?"), problems)
    if problems:
        print("\n".join(problems))
        sys.exit(1)

    class Response:  # what ApiClient.deserialize reads
        data = yaml.safe_dump(doc)

    kserve.ApiClient().deserialize(Response(), "V1beta1InferenceService")
    print("ok")
