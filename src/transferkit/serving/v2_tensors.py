"""The Open Inference Protocol's tensors (KServe v2 REST, Triton's HTTP API): an inference request's body in,
a response's body out, with JSON tensors and the binary tensor data extension both ways.

    POST /v2/models/{name}/infer
      {"id": "7", "parameters": {"top_k": 3},
       "inputs":  [{"name": "image",  "datatype": "BYTES", "shape": [2],         "data": ["<base64>", ...]}],
       "outputs": [{"name": "mnist.labels", "parameters": {"binary_data": true}}]}
    or the binary extension: the same JSON with {"parameters": {"binary_data_size": n}} in place of "data", the
    tensors' bytes after it, and the JSON's length in the Inference-Header-Content-Length header.

What a request may carry is the model's metadata (v2_model.py): `image` (BYTES, encoded JPEG/PNG/WebP files;
in JSON each element is the file's base64, as a string or as {"b64": "..."}: the protocol's JSON strings
are UTF-8 text, which an image file is not) or `tensor` (FP32 [N,3,S,S], already preprocessed). Every problem
is a ClientError with a sentence that names the fix; the HTTP layer answers it as {"error": "..."}.
Nothing here touches the model: parsing is pure and runs off the event loop for large bodies.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from transferkit.serving.inputs import ClientError

HEADER_LENGTH = "inference-header-content-length"
NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
NUMPY_TYPES |= {"UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_}
DATATYPES = ("BYTES", *NUMPY_TYPES)
MAX_DIMS = 8  # dimensions of an input's shape, and levels of nesting of its JSON data
_END = object()
# JSON tensor data grows about tenfold as Python objects: a JSON part over this is refused (413) before it is parsed,
# and the binary tensor extension (`binary_data_size`) carries large tensors instead
MAX_JSON_BYTES = 8 << 20
# A model answers three outputs per head; a request naming more than this many is refused before they are read
# (the model's own count, and duplicates, are checked where the model is known: v2_routes._wanted).
MAX_REQUESTED_OUTPUTS = 64
# "name" keys a request may hold before it is parsed: its outputs, its inputs, and room for BYTES data that happen
# to read "name" (valid base64), at most one per image
MAX_NAMED_OBJECTS = 4 * MAX_REQUESTED_OUTPUTS


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # Triton's classification extension: the top-n as "score:index:label" strings


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    value: np.ndarray | list[bytes]  # a numpy array, or BYTES elements in row-major order


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """A gzip or deflate request body (tritonclient's request_compression_algorithm), refused with 413 past
    `max_bytes` decompressed, so a small compressed body cannot expand without bound."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ClientError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise ClientError(400, f"the {encoding} body does not decompress ({exc})") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise ClientError(413, f"the request body is over the {max_bytes // 2**20} MB limit once decompressed")
    return out


def parse_request(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """The body of POST .../infer -> InferRequest, with each input's data as numpy or a list of bytes. A BYTES
    input of more than `max_images` elements is refused (413) before its elements are read."""
    json_part, binary = _split(body, header_length)
    # every input and output object has a "name" key: far more of them than a request can use is refused before
    # the JSON is parsed (orjson holds the GIL while it builds 200,000 objects); bytes.count is a memchr-fast scan
    if json_part.count(b'"name"') > MAX_NAMED_OBJECTS:
        raise ClientError(
            400,
            f"the request names more than {MAX_NAMED_OBJECTS} inputs and outputs; name each output once "
            f"(at most {MAX_REQUESTED_OUTPUTS})",
        )
    if len(json_part) > MAX_JSON_BYTES:
        raise ClientError(
            413,
            f"the request's JSON is {len(json_part) >> 20} MB, over the {MAX_JSON_BYTES >> 20} MB limit for JSON; "
            "send large tensors with the binary tensor extension (binary_data_size), as Triton's clients do",
        )
    try:
        data = orjson.loads(json_part)  # in C: the JSON of a small request costs more than its image in Python
    except orjson.JSONDecodeError as exc:
        raise ClientError(400, f"the inference request's JSON does not parse ({exc})") from None
    if not isinstance(data, dict):
        raise ClientError(400, 'the inference request must be a JSON object with "inputs"')
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ClientError(400, '"inputs" must be a non-empty list of tensors ({"name", "shape", "datatype", "data"})')
    parameters = _object(data.get("parameters"), "parameters")
    offset, tensors = 0, []
    for i, raw in enumerate(inputs):
        tensor, offset = _input(raw, i, binary, offset, max_images)
        tensors.append(tensor)
    if offset != len(binary):
        raise ClientError(400, f"the binary section holds {len(binary)} bytes, the inputs' binary_data_size {offset}")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ClientError(400, "parameter binary_data_output must be true or false")
    outputs = data.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ClientError(400, '"outputs" must be a list of {"name": ...}')
        if len(outputs) > MAX_REQUESTED_OUTPUTS:  # before a loop over them: 200,000 entries fit in 5 MB
            raise ClientError(
                400, f'"outputs" lists {len(outputs)} entries, over {MAX_REQUESTED_OUTPUTS}; name each output once'
            )
        outputs = [_output(o, default_binary) for o in outputs]
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ClientError(400, '"id" must be a string')
    return InferRequest(tensors, outputs, request_id, parameters)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ClientError(400, f"Inference-Header-Content-Length {header_length!r} is not a number") from None
    if not 0 < n <= len(body):
        raise ClientError(400, f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte body")
    return body[:n], body[n:]


def _object(value: Any, what: str, *args: Any) -> dict[str, Any]:
    """`value` if it is a JSON object ({} for none); `what % args` names it in the error (formatted only then:
    this runs for every tensor of every request)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError(400, f'"{what % args}" must be a JSON object')
    return value


def _input(raw: Any, i: int, binary: bytes, offset: int, max_images: int) -> tuple[InputTensor, int]:
    if not isinstance(raw, dict):
        raise ClientError(400, f"inputs[{i}] must be an object with name, shape, datatype and data")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise ClientError(400, f'inputs[{i}] has no "name"')
    if datatype not in DATATYPES:
        raise ClientError(400, f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ClientError(400, f'input {name!r}: "shape" must be a list of non-negative integers')
    if len(shape) > MAX_DIMS:  # numpy refuses more than 64 with a ValueError; the model takes 1 or 4
        raise ClientError(400, f"input {name!r}: a shape of {len(shape)} dimensions, over {MAX_DIMS}")
    count = math.prod(shape)
    if datatype == "BYTES" and count > max_images:
        raise ClientError(413, f"input {name!r}: {count} images in one request, over the limit of {max_images}")
    size = _object(raw.get("parameters"), "inputs[%d].parameters", i).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise ClientError(400, f"input {name!r}: binary_data_size {size!r} is past the end of the body")
        chunk = binary[offset : offset + size]
        value = _from_binary(chunk, datatype, count, name)
        offset += size
    elif "data" in raw:
        value = _from_json(raw["data"], datatype, count, name)
    else:
        raise ClientError(400, f'input {name!r} has neither "data" nor a binary_data_size parameter')
    if isinstance(value, np.ndarray):
        value = value.reshape(shape)
    return InputTensor(name, datatype, tuple(shape), value), offset


def _from_binary(chunk: bytes, datatype: str, count: int, name: str) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise ClientError(400, f"input {name!r}: a BYTES element's 4-byte length is cut off")
            n = int.from_bytes(chunk[pos : pos + 4], "little")
            if pos + 4 + n > len(chunk):
                raise ClientError(400, f"input {name!r}: a BYTES element of {n} bytes runs past its tensor")
            items.append(chunk[pos + 4 : pos + 4 + n])
            pos += 4 + n
        _check_count(len(items), count, name)
        return items
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise ClientError(400, f"input {name!r}: {len(chunk)} bytes of {datatype} is not the shape's {count} elements")
    return np.frombuffer(chunk, dtype).astype(dtype.newbyteorder("="), copy=False)


def _from_json(data: Any, datatype: str, count: int, name: str) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        items = _flatten(data, count, name)
        _check_count(len(items), count, name)
        return [_base64(item, name) for item in items]
    try:
        array = np.asarray(data, dtype=NUMPY_TYPES[datatype])
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ClientError(400, f"input {name!r}: data is not a (nested) list of {datatype} numbers") from None
    _check_count(array.size, count, name)
    return array.reshape(-1)


def _flatten(data: Any, count: int, name: str) -> list[Any]:
    """The leaves of a nested list in order, without recursion (JSON nests up to orjson's 1,024 levels, past
    Python's recursion limit), and refused as soon as there are more than the shape's `count`."""
    out: list[Any] = []
    stack = [iter(data)] if isinstance(data, list) else [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= MAX_DIMS:
                raise ClientError(400, f"input {name!r}: data nested deeper than {MAX_DIMS} levels")
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > count:
                raise ClientError(400, f"input {name!r}: more elements than its shape's {count}")
    return out


def _base64(item: Any, name: str) -> bytes:
    text = item.get("b64") if isinstance(item, dict) else item
    if not isinstance(text, str):
        raise ClientError(400, f'input {name!r}: each BYTES element in JSON is a base64 string or {{"b64": ...}}')
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(
            400,
            f"input {name!r}: an element is not base64; in JSON send each file base64-encoded, or send it "
            "as binary data (binary_data_size)",
        ) from None


def _check_count(got: int, count: int, name: str) -> None:
    if got != count:
        raise ClientError(400, f"input {name!r}: {got} elements where its shape says {count}")


def _output(raw: Any, default_binary: bool) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ClientError(400, 'each of "outputs" must be an object with a "name"')
    params = _object(raw.get("parameters"), "outputs %r parameters", raw["name"])
    binary = params.get("binary_data", default_binary)
    top = params.get("classification", 0)
    if not isinstance(binary, bool):
        raise ClientError(400, f"output {raw['name']!r}: binary_data must be true or false")
    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise ClientError(400, f"output {raw['name']!r}: classification must be a non-negative integer")
    return RequestedOutput(raw["name"], binary, top)


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    value: np.ndarray  # float32, or an object array of bytes


def encode_response(header: dict[str, Any], outputs: list[tuple[OutputTensor, bool]]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON part's length for
    Inference-Header-Content-Length (None: the body is JSON only)."""
    chunks, described = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.value.shape)}
        if binary:
            raw = _to_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [b.decode() for b in tensor.value.ravel().tolist()]  # labels: UTF-8 text
        else:
            entry["data"] = tensor.value.ravel()  # orjson writes a float32 array as float32 (shortest form)
        described.append(entry)
    head = orjson.dumps({**header, "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def _to_binary(tensor: OutputTensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join([len(b).to_bytes(4, "little") + b for b in tensor.value.ravel().tolist()])
    return np.ascontiguousarray(tensor.value, dtype="<f4").tobytes()
