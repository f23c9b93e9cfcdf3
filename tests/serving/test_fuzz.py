"""Property-based fuzzing of /predict (in-process, the same ASGI app the server runs): whatever the bytes,
the answer is a 200 or a 4xx with a JSON error, never a 5xx, and the service answers a good request after."""

import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLIENT_ERRORS = {400, 413, 415}


def _check(response) -> None:
    assert response.status_code == 200 or response.status_code in CLIENT_ERRORS, (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["error"]


def _mutate(data: bytes, draw) -> bytes:
    """Flip, cut or splice bytes of a real image: decoders see almost-valid files, where bugs live."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del out[pos : pos + draw(st.integers(1, 64))]
        else:
            out[pos:pos] = draw(st.binary(min_size=1, max_size=32))
    return bytes(out)


@FUZZ
@given(data=st.data())
def test_mutated_real_images_never_get_a_5xx(client, images, data):
    name = data.draw(st.sampled_from(sorted(images)))
    payload = _mutate(images[name], data.draw)
    _check(client.post("/predict", files={"image": (name, payload)}))


@FUZZ
@given(
    payload=st.binary(max_size=2048),
    field=st.sampled_from(["image", "images", "top_k", "other"]),
    filename=st.one_of(st.none(), st.text(max_size=20)),
    # any header value a client can send: HTTP clients (httpx builds the part's headers) and servers (h11) refuse
    # control characters in one, so such a request never reaches the server
    mime=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30),
)
def test_arbitrary_uploads_never_get_a_5xx(client, payload, field, filename, mime):
    _check(client.post("/predict", files={field: (filename, payload, mime or None)}))


@FUZZ
@given(
    body=st.binary(max_size=2048),
    boundary=st.text(st.characters(codec="ascii"), min_size=0, max_size=20),
    content_type=st.sampled_from(["multipart/form-data", "application/json", "image/png", ""]),
)
def test_arbitrary_bodies_never_get_a_5xx(client, body, boundary, content_type):
    header = f"{content_type}; boundary={boundary}" if content_type.startswith("multipart") else content_type
    _check(client.post("/predict", content=body, headers={"content-type": header}))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    value=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"images": st.lists(st.binary(max_size=256).map(lambda b: base64.b64encode(b).decode()), max_size=40)},
            optional={"top_k": json_values},
        ),
    )
)
def test_arbitrary_json_never_gets_a_5xx(client, value):
    _check(client.post("/predict", json=value))


def test_still_serving_after_the_fuzzing(client, images):
    assert client.post("/predict", files={"image": ("d.png", images["digit.png"])}).status_code == 200
