"""What the project tells people to run, run against the served application: the OpenAI snippet
`speccascade serve` prints, and the commands of the chart's `helm test` pod."""

from __future__ import annotations

import json
import textwrap

import pytest
from speccascade.app.launcher import Endpoints
from speccascade.cli import main
from speccascade.commands.serve import usage
from speccascade.k8s import HelmError, find_helm, render_chart, select_kind

from ..served import SERVE_APP


def test_the_openai_snippet_printed_by_serve_streams_a_chat_completion(served, openai_base_url, capsys):
    printed = usage(Endpoints(SERVE_APP, served, openai_base_url))
    lines = printed.splitlines()
    start = lines.index("  from openai import OpenAI")
    end = lines.index("", start)
    snippet = textwrap.dedent("\n".join(lines[start:end]))
    assert openai_base_url in snippet and "extra_body" in snippet
    exec(compile(snippet, "<speccascade serve usage>", "exec"), {})
    assert capsys.readouterr().out.strip()  # streamed text


def test_the_grpc_client_command_printed_by_serve_works(served, openai_base_url, capsys):
    (command,) = [line.split() for line in usage(Endpoints(SERVE_APP, served, openai_base_url)).splitlines()
                  if line.strip().startswith("speccascade client")]
    assert main([*command[1:3], served, "--raw", "-n", "8", "--no-color", "def add(a, b):"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def test_pod_commands() -> list[list[str]]:
    try:
        helm = find_helm()
    except HelmError as error:
        pytest.skip(f"helm is not installed ({error})")
    (pod,) = select_kind(render_chart(helm=helm), "Pod", "v1")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return [c["command"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]]


def test_the_helm_test_pod_commands_pass_against_a_served_application(served, openai_base_url, test_pod_commands,
                                                                      capsys):
    """The pod's commands as rendered, with the in-cluster Service address swapped for this one."""
    for command in test_pod_commands:
        assert command[0] == "speccascade"
        argv = [f"--target={served}" if arg.startswith("--target=") else
                f"--openai-url={openai_base_url}" if arg.startswith("--openai-url=") else arg for arg in command[1:]]
        assert main(argv) == 0, argv
    health, generate, models = capsys.readouterr().out.strip().splitlines()
    assert health == f"{served}: SERVING"
    response = json.loads(generate)
    assert response["text"] and 0 < response["usage"]["completion_tokens"] <= 8
    assert models == f"{openai_base_url}/models: SERVING"
