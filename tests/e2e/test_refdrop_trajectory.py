"""RefDrop trajectory references (Reference storage: Trajectory) against a real headless Forge (random SD1.5, CPU)."""

from __future__ import annotations

import pytest

from tests.e2e import forge
from tests.e2e.test_refdrop import refdrop


@pytest.fixture(scope="module")
def plain(server):
    return {seed: server.generate(forge.payload(seed=seed)).image for seed in (1, 2)}


@pytest.fixture(scope="module")
def recorded(server):
    body = refdrop(forge.payload(seed=1), mode="Record", reference="traj", save=True, storage="Trajectory")
    out = server.generate(body)
    assert "refdrop_storage: Trajectory" in out.infotext
    return out


def test_trajectory_record_leaves_the_image_unchanged_and_is_small(server, recorded, plain):
    assert forge.max_diff(recorded.image, plain[1]) == 0
    refs = {r["name"]: r for r in server.get("/imgcond/v1/refdrop/references")}
    assert refs["traj"]["storage"] == "trajectory" and refs["traj"]["saved"] and refs["traj"]["family"] == "sd15"
    size = (server.data_dir / "models" / "imgcond" / "refdrop" / "traj.safetensors").stat().st_size
    print(f"\ntrajectory file (SD1.5 64², 3 steps): {size} bytes; in RAM: {refs['traj']['bytes']} bytes")
    from lib_imgcond.refdrop import trajectory as rt

    # 3 latents 4×8×8 and sigmas, the cond and uncond 77×768 contexts (fp32): the context dominates at this size
    assert refs["traj"]["bytes"] == rt.estimate_bytes((1, 4, 8, 8), 3, [(1, 77, 768)], branches=2) == 476_172
    assert size < refs["traj"]["bytes"] + 16_384  # + the header


def test_trajectory_use_same_seed_reproduces_the_plain_image(server, recorded, plain):
    out = server.generate(refdrop(forge.payload(seed=1), mode="Use", reference="traj", coefficient=0.7))
    assert forge.max_diff(out.image, plain[1]) == 0
    assert "refdrop_storage" not in out.infotext  # a Record choice: Use reads the reference's own kind


def test_trajectory_use_other_seed_changes_the_image(server, recorded, plain):
    out = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="traj", coefficient=0.5))
    assert forge.max_diff(out.image, plain[2]) > 0
    pytest.traj_pos = out.image
    kv = server.generate(refdrop(forge.payload(seed=1), mode="Record", reference="traj-kv"))
    assert forge.max_diff(kv.image, plain[1]) == 0
    from_kv = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="traj-kv", coefficient=0.5))
    assert forge.max_diff(from_kv.image, out.image) == 0  # the replay gives the K/V recording's K/V bit for bit
    assert forge.max_diff(server.generate(forge.payload(seed=2)).image, plain[2]) == 0  # nothing leaks


def test_trajectory_with_uncond_other_steps_and_size(server, plain):
    server.generate(
        refdrop(forge.payload(seed=1), mode="Record", reference="traj-u", uncond=True, storage="Trajectory")
    )
    same = server.generate(refdrop(forge.payload(seed=1), mode="Use", reference="traj-u", uncond=True, coefficient=0.6))
    assert forge.max_diff(same.image, plain[1]) == 0
    other = server.generate(
        refdrop(forge.payload(seed=2), mode="Use", reference="traj-u", uncond=True, coefficient=0.6)
    )
    assert forge.max_diff(other.image, plain[2]) > 0
    body = refdrop(forge.payload(seed=2, steps=5, width=128), mode="Use", reference="traj-u", coefficient=0.4)
    assert server.generate(body).image.shape == (64, 128, 3)


def test_trajectory_hires_round_trip(server):
    body = forge.payload(seed=4, enable_hr=True)
    base = server.generate(body)
    server.generate(refdrop(body, mode="Record", reference="traj-hr", hires=True, storage="Trajectory"))
    same = server.generate(refdrop(body, mode="Use", reference="traj-hr", hires=True, coefficient=0.5))
    assert forge.max_diff(same.image, base.image) == 0


def test_trajectory_refused_in_mode_image(server, plain):
    body = refdrop(forge.payload(), mode="Image", reference="x", image=forge.encode(plain[1]), storage="Trajectory")
    assert "refdrop.storage='Trajectory'" in server.generate_error(body)


def test_saved_trajectory_survives_restart(server, recorded):
    server.restart()
    refs = {r["name"]: r for r in server.get("/imgcond/v1/refdrop/references")}
    assert refs["traj"]["storage"] == "trajectory" and not refs["traj"]["in_ram"]
    out = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="traj", coefficient=0.5))
    assert forge.max_diff(out.image, pytest.traj_pos) == 0


@pytest.mark.sdxl
def test_sdxl_trajectory_record_use(sdxl_server):
    """SDXL: the conditioning has `y` besides the context; same seed ⇒ the plain image, another seed ⇒ changed."""
    body = forge.payload(seed=1, steps=2)
    plain = sdxl_server.generate(body)
    rec = sdxl_server.generate(refdrop(body, mode="Record", reference="xl-traj", storage="Trajectory", save=True))
    assert forge.max_diff(rec.image, plain.image) == 0
    refs = {r["name"]: r for r in sdxl_server.get("/imgcond/v1/refdrop/references")}
    assert refs["xl-traj"]["family"] == "sdxl" and refs["xl-traj"]["storage"] == "trajectory"
    print(f"\nSDXL trajectory (64², 2 steps): {refs['xl-traj']['bytes']} bytes")
    same = sdxl_server.generate(refdrop(body, mode="Use", reference="xl-traj", coefficient=0.7))
    assert forge.max_diff(same.image, plain.image) == 0
    other = forge.payload(seed=2, steps=2)
    used = sdxl_server.generate(refdrop(other, mode="Use", reference="xl-traj", coefficient=0.5))
    assert forge.max_diff(used.image, sdxl_server.generate(other).image) > 0
