"""RefDrop mode Batch (consistent batch) against a real headless Forge (random SD1.5 weights, CPU)."""

from __future__ import annotations

import pytest

from tests.e2e import forge

TITLE = "refdrop"


def batch(body: dict, **args) -> dict:
    return forge.with_script(body, TITLE, [{"mode": "Batch", **args}])


def images(out: forge.Result, shape=(64, 64, 3)) -> list:
    """The batch's images (a grid, where the host returns one, has another size)."""
    return [img for img in out.images if img.shape == shape]


@pytest.fixture(scope="module")
def plain(server):
    return images(server.generate(forge.payload(seed=10, batch_size=2)))


def test_c_zero_or_rate_zero_is_the_plain_batch(server, plain):
    assert len(plain) == 2
    for args in ({"coefficient": 0.0, "rate": 0.5}, {"coefficient": 0.5, "rate": 0.0}):
        out = server.generate(batch(forge.payload(seed=10, batch_size=2), **args))
        assert [forge.max_diff(a, b) for a, b in zip(images(out), plain, strict=True)] == [0, 0], args
        assert "refdrop_mode: Batch" in out.infotext


def test_c_positive_changes_every_image_and_leaves_no_trace(server, plain):
    body = batch(forge.payload(seed=10, batch_size=2), coefficient=0.5, rate=0.5)
    out = server.generate(body)
    got = images(out)
    assert len(got) == 2 and all(forge.max_diff(a, b) > 0 for a, b in zip(got, plain, strict=True))
    text = out.infotext
    assert "refdrop_rate: 0.5" in text and "refdrop_coefficient: 0.5" in text
    assert "refdrop_reference" not in text and "refdrop_batch_sets" not in text  # no effect: not written
    again = images(server.generate(body))
    assert all(forge.max_diff(a, b) == 0 for a, b in zip(again, got, strict=True))  # seeded: reproducible
    after = images(server.generate(forge.payload(seed=10, batch_size=2)))
    assert all(forge.max_diff(a, b) == 0 for a, b in zip(after, plain, strict=True))  # no leak into a plain run


def test_batch_size_one_is_refused(server):
    err = server.generate_error(batch(forge.payload(seed=10), coefficient=0.5))
    assert "refdrop.mode='Batch'" in err and "batch size of at least 2" in err


def test_prompt_lines_change_the_images_and_show_in_each_infotext(server, plain):
    lines = "in a forest\non a beach"
    out = server.generate(batch(forge.payload(seed=10, batch_size=2), coefficient=0.0, prompt_lines=lines))
    got = images(out)
    assert all(forge.max_diff(a, b) > 0 for a, b in zip(got, plain, strict=True))
    texts = out.info["infotexts"]
    assert texts[0].startswith("a photo of a cat, in a forest\n"), texts[0]
    assert texts[1].startswith("a photo of a cat, on a beach\n"), texts[1]
    assert all("refdrop_prompt_lines" not in t for t in texts)
    err = server.generate_error(batch(forge.payload(seed=10, batch_size=2), prompt_lines="a\nb\nc"))
    assert "refdrop.prompt_lines" in err


def test_first_batch_is_the_reference_for_later_batches(server):
    body = forge.payload(seed=20, batch_size=2, n_iter=2)
    own = images(server.generate(batch(body, coefficient=0.5, rate=0.5)))
    first = server.generate(
        batch(body, coefficient=0.5, rate=0.5, batch_sets="first batch is the reference for later batches")
    )
    ref = images(first)
    assert len(own) == len(ref) == 4
    assert [forge.max_diff(a, b) for a, b in zip(own[:2], ref[:2], strict=True)] == [0, 0]
    assert all(forge.max_diff(a, b) > 0 for a, b in zip(own[2:], ref[2:], strict=True))
    assert "refdrop_batch_sets: first batch is the reference for later batches" in first.infotext


def test_hires_pass_too(server):
    body = forge.payload(seed=30, batch_size=2, enable_hr=True)
    shape = (128, 128, 3)
    plain = images(server.generate(body), shape)
    first_only = images(server.generate(batch(body, coefficient=0.5, rate=0.5)), shape)
    both = images(server.generate(batch(body, coefficient=0.5, rate=0.5, hires=True)), shape)
    assert all(forge.max_diff(a, b) > 0 for a, b in zip(first_only, plain, strict=True))
    assert all(forge.max_diff(a, b) > 0 for a, b in zip(both, first_only, strict=True))
    late = images(server.generate(batch(body, coefficient=0.5, rate=0.5, start=1.0, end=1.0)), shape)
    assert all(forge.max_diff(a, b) == 0 for a, b in zip(late, plain, strict=True))  # empty step window


def test_layers_and_uncond_branch_select_where_it_applies(server, plain):
    body = forge.payload(seed=10, batch_size=2)
    everywhere = images(server.generate(batch(body, coefficient=0.5, rate=0.5)))
    output = images(server.generate(batch(body, coefficient=0.5, rate=0.5, layers="output")))
    uncond = images(server.generate(batch(body, coefficient=0.5, rate=0.5, uncond=True)))
    for got in (output, uncond):
        assert all(forge.max_diff(a, b) > 0 for a, b in zip(got, plain, strict=True))
        assert all(forge.max_diff(a, b) > 0 for a, b in zip(got, everywhere, strict=True))
