"""`feedloop simulate`: simulated users talk to a running feedloop over HTTP, each judging answers
by a hidden preference (`sim.preferences`), and the simulation measures, round after round,
whether the served policy moves their way.

Top to bottom: config, the prompts, users (chat and feedback), measuring on held-out prompts,
waiting for the trainer, the table / JSON / plot, `run`.

Only the HTTP API is used: chat through the official `openai` client with user keys; feedback
through POST /v1/feedback, /v1/rankings, /v1/preferences; an operator key to create those user
keys and to read GET /v1/admin/training/runs and /v1/admin/models. Rounds happen on the trainer's
own schedule: the simulation never starts one, it waits for the next one to finish.

Held-out prompts: `schemas.bundled.heldout_prompts`, the same set the gates measure on (read
from the bundled data files: no torch, no models). Users never ask them; only the measurement
does, and the trainer leaves them out of PPO.

Win rate against the first version: at the start the simulation records the served version's
(normally `v1`) answers to the held-out prompts, `eval_samples` per prompt; each round's served
answers are compared with those, every new answer against every recorded one of the same prompt,
judged by the hidden preference, ties counting half. (A pinned `model="v1"` only answers while v1
is loaded, and an archived version is not; recording its answers keeps serving untouched.)
"""
import argparse
import itertools
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from schemas.bundled import heldout_prompts, training_prompts as user_prompts
from sim.preferences import BUILTIN, SWITCHING, Preference, Switching, resolve


@dataclass
class SimConfig:
    url: str = "http://127.0.0.1:8000"
    """the API's base URL (without /v1)"""
    api_key: str = ""
    """an operator key: creates the users' keys, reads training runs and the registry"""
    users: int = 8
    """simulated users, each with its own API key, talking concurrently"""
    preferences: list[str] = field(default_factory=lambda: ["brevity"])
    """hidden preferences, dealt round-robin to the users: built-in names or module:function"""
    noise: float = 0.1
    """share of feedback acts that are random (half of them) or contrary (the other half)"""
    rounds: int = 5
    """training rounds to wait for and measure"""
    requests_per_round: int = 300
    """chat requests all users send between two rounds"""
    seed: int = 0
    json_path: Path = Path("simulation.json")
    png_path: Path = Path("simulation.png")

    # how users chat and judge
    choices: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    """`n` a request asks for, drawn per request; n >= 2 is ranked or compared pairwise"""
    temperature: float = 1.0
    """sampling temperature of users' requests and of the measurement"""
    max_tokens: int = 32
    """answer length cap of users' requests and of the measurement"""
    feedback_rate: float = 0.9
    """share of requests a user says something about"""
    ranking_rate: float = 0.7
    """with n >= 2: share of judged requests ranked (the rest: one pairwise preference, best vs worst)"""
    thumbs_rate: float = 0.5
    """with n = 1: share of judged answers given thumbs (the rest: a 1-7 rating)"""
    correction_rate: float = 0.03
    """share of judged requests whose worst answer is corrected (preferences that can correct)"""
    model: str = "feedloop"
    """the served model name"""

    # measuring
    eval_samples: int = 4
    """answers per held-out prompt per measurement (one request with n = eval_samples)"""
    eval_prompts: int | None = None
    """measure on the first this many held-out prompts (None: all)"""
    round_timeout: float | None = None
    """seconds to wait for a round before giving up (None: as long as the schedule takes)"""
    ready_timeout: float = 30.0
    """seconds to wait for the API to be ready (GET /ready) before starting"""
    until_win_rate: float | None = None
    """stop early once every preference's win rate reaches this (a switching one's: against the
    version served before the switch)"""
    swap_timeout: float = 120.0
    """seconds to wait for serving to switch to a newly promoted version"""


# --- users ----------------------------------------------------------------------------------------

class Api:
    """The operator's view over HTTP: keys, training runs, the registry, what serves."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"},
                                 timeout=60)

    def get(self, path: str, **params) -> dict:
        r = self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def create_key(self, name: str) -> str:
        r = self.http.post("/v1/admin/keys", json={"name": name, "role": "user"})
        r.raise_for_status()
        return r.json()["key"]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if self.http.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{self.http.base_url} is not ready after {timeout:g}s")
            time.sleep(1.0)

    def runs(self, limit: int = 100) -> list[dict]:
        return self.get("/v1/admin/training/runs", limit=limit)["data"]

    def active_policy(self) -> dict | None:
        return next((v for v in self.get("/v1/admin/models")["data"]
                     if v["kind"] == "policy" and v["status"] == "active"), None)


@dataclass
class User:
    name: str
    preference_name: str
    preference: Preference
    key: str
    rng: random.Random
    seen: list[float] = field(default_factory=list)
    """scores of the answers this user has read: what "good" means to them (thumbs, ratings)"""
    gaps: list[float] = field(default_factory=list)
    """score differences of the pairs they compared: what "clearly better" means to them"""


def openai_client(url: str, key: str):
    from openai import OpenAI
    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key=key, max_retries=3, timeout=120)


def mood(user: User, noise: float) -> str | None:
    """How this feedback act is given: honestly (None), or with probability `noise` at random
    or contrary to the user's preference (half and half)."""
    if user.rng.random() >= noise:
        return None
    return "random" if user.rng.random() < 0.5 else "contrary"


def ranking(said: list[float]) -> list:
    """Choice indices best first, equal votes tied in an inner list: [[2, 0], 1]."""
    tiers = []
    for _, group in itertools.groupby(sorted(range(len(said)), key=lambda i: -said[i]), key=lambda i: said[i]):
        group = list(group)
        tiers.append(group if len(group) > 1 else group[0])
    return tiers


def rating(user: User, score: float) -> int:
    """1-7 by where the score sits among what this user has read (4 until they have read a few)."""
    if len(user.seen) < 5:
        return 4
    below = sum(s < score for s in user.seen) + 0.5 * sum(s == score for s in user.seen)
    return 1 + min(6, int(7 * below / len(user.seen)))


@dataclass
class Exchange:
    """One chat request as a user read it: the prompt, the response id, the answers and their
    hidden scores, and what this user usually reads (for thumbs)."""
    prompt: str
    response_id: str
    answers: list[str]
    scores: list[float]
    expected: float | None


def ask(user: User, client, prompt: str, cfg: SimConfig) -> Exchange:
    n = user.rng.choice(cfg.choices)
    r = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": prompt}], n=n,
                                       temperature=cfg.temperature, max_tokens=cfg.max_tokens, user=user.name)
    answers = [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]
    scores = [float(user.preference(prompt, a)) for a in answers]
    expected = statistics.fmean(user.seen) if user.seen else None
    user.seen += scores
    return Exchange(prompt, r.id, answers, scores, expected)


def judge(user: User, http: httpx.Client, ex: Exchange, cfg: SimConfig) -> Counter:
    """Like a person, maybe some feedback on one exchange: with n >= 2 a ranking or one pairwise
    choice, with n = 1 thumbs (against what they usually read) or a 1-7 rating; now and then a
    corrected answer. Returns what was sent."""
    sent = Counter()
    if user.rng.random() >= cfg.feedback_rate:
        return sent
    n, scores = len(ex.answers), ex.scores
    how = mood(user, cfg.noise)
    if how:
        sent[f"noise_{how}"] += 1
    said = {None: scores, "contrary": [-s for s in scores], "random": [user.rng.random() for _ in scores]}[how]

    def post(path: str, body: dict, kind: str) -> None:
        res = http.post(path, json=body)
        if res.status_code != 200:
            raise RuntimeError(f"POST {path} answered {res.status_code}: {res.text[:500]}")
        sent[kind] += 1

    ref = lambda i: {"response_id": ex.response_id, "choice_index": i}
    best, worst = max(range(n), key=lambda i: said[i]), min(range(n), key=lambda i: said[i])
    if n >= 2 and said[best] != said[worst]:
        if user.rng.random() < cfg.ranking_rate:
            post("/v1/rankings", {"response_id": ex.response_id, "order": ranking(said)}, "rankings")
        else:
            gap = abs(said[best] - said[worst])
            clear = not user.gaps or gap >= statistics.median(user.gaps)
            user.gaps.append(gap)
            post("/v1/preferences", {"chosen": ref(best), "rejected": ref(worst), "strength": 1.0 if clear else 0.5},
                 "preferences")
    elif n == 1 and user.rng.random() < cfg.thumbs_rate:
        if ex.expected is not None and scores[0] != ex.expected:
            up = scores[0] > ex.expected
            up = {None: up, "contrary": not up, "random": user.rng.random() < 0.5}[how]
            post("/v1/feedback", {**ref(0), "kind": "thumbs", "value": 1 if up else -1}, "thumbs")
    elif n == 1:
        value = {None: rating(user, scores[0]), "contrary": 8 - rating(user, scores[0]),
                 "random": user.rng.randint(1, 7)}[how]
        post("/v1/feedback", {**ref(0), "kind": "rating", "value": value}, "ratings")
    correct = getattr(user.preference, "correct", None)
    if correct and user.rng.random() < cfg.correction_rate:  # written deliberately: no noise
        worst = min(range(n), key=lambda i: scores[i])
        better = correct(ex.prompt, ex.answers[worst])
        if better and better.strip() and better != ex.answers[worst]:
            post("/v1/feedback", {**ref(worst), "kind": "correction", "text": better}, "corrections")
    return sent


def chat_round(users: list[User], cfg: SimConfig, prompts: list[str], rng: random.Random) -> Counter:
    """`requests_per_round` requests spread over the users, who talk concurrently; then each
    says what they think of what they read. Feedback comes after the talk, so it lands in the
    trainer's data within a second or two, not spread over the round's chat: the next round
    then takes a whole round's feedback, not some of it."""
    todo = {u.name: [] for u in users}
    for i in range(cfg.requests_per_round):
        todo[users[i % len(users)].name].append(rng.choice(prompts))
    total, lock = Counter(), threading.Lock()

    def talk(user: User) -> list[Exchange]:
        client = openai_client(cfg.url, user.key)
        return [ask(user, client, prompt, cfg) for prompt in todo[user.name]]

    def give_feedback(user: User, exchanges: list[Exchange]) -> None:
        with httpx.Client(base_url=cfg.url.rstrip("/"), headers={"Authorization": f"Bearer {user.key}"},
                          timeout=60) as http:
            for ex in exchanges:
                sent = judge(user, http, ex, cfg)
                with lock:
                    total.update(sent)

    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        read = list(pool.map(talk, users))
        total["requests"] = sum(len(r) for r in read)
        list(pool.map(give_feedback, users, read))
    return total


# --- measuring --------------------------------------------------------------------------------------

def sample_heldout(client, prompts: list[str], cfg: SimConfig) -> dict[str, dict]:
    """Per held-out prompt: one request for `eval_samples` answers with a fixed seed; the
    response id and the version that answered (system_fingerprint) with them."""
    def one(item):
        i, prompt = item
        r = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": prompt}],
                                           n=cfg.eval_samples, temperature=cfg.temperature,
                                           max_tokens=cfg.max_tokens, seed=cfg.seed * 1000 + i,
                                           user="simulate-eval")
        return prompt, {"response_id": r.id, "version": r.system_fingerprint,
                        "answers": [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]}

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, enumerate(prompts)))


def win_rate(pref: Preference, new: dict[str, dict], base: dict[str, dict]) -> float:
    """Mean over prompts of P(new answer beats a baseline answer), ties half."""
    per_prompt = []
    for prompt, sample in new.items():
        duels = [1.0 if a > b else 0.5 if a == b else 0.0
                 for a, b in itertools.product([pref(prompt, x) for x in sample["answers"]],
                                               [pref(prompt, y) for y in base[prompt]["answers"]])]
        per_prompt.append(statistics.fmean(duels))
    return statistics.fmean(per_prompt)


def mean_score(pref: Preference, sample: dict[str, dict]) -> float:
    return statistics.fmean(pref(p, a) for p, s in sample.items() for a in s["answers"])


def measure(prefs: dict[str, Preference], sample: dict[str, dict], base: dict[str, dict],
            switch_base: dict[str, dict] | None = None) -> dict:
    """Per preference: mean score and win rate against the first version; once a switching
    preference has switched, also against the version served just before it did (`win_vs_switch`)."""
    out = {}
    for name, f in prefs.items():
        out[name] = {"score": mean_score(f, sample), "win_rate": win_rate(f, sample, base)}
        if switch_base is not None and isinstance(f, Switching):
            out[name]["win_vs_switch"] = win_rate(f, sample, switch_base)
    return out


# --- waiting for the trainer ----------------------------------------------------------------------

FINISHED = ("succeeded", "skipped", "failed")
PATIENCE = 120.0  # a round due later than this is the deployment's schedule: the users go on


def round_over(runs: list[dict], after: int, patience: float) -> bool:
    """Whether the trainer has answered this round's feedback: a round newer than `after` (the
    newest when the feedback was in) finished, other than one that skipped to wait for evidence
    it will train on within `patience` seconds if no more comes. One that waits for more feedback
    than was given ends the wait: the next round's users give it."""
    for r in runs:
        if r["id"] <= after or r["status"] not in FINISHED:
            continue
        metrics = r.get("metrics") or {}
        due = metrics.get("data/trains_in_seconds")
        if not (metrics.get("data/waiting") and due is not None and due <= patience):
            return True
    return False


def wait_for_round(api: Api, since: int, after: int, timeout: float | None, say) -> tuple[dict | None, list[dict]]:
    """Wait for the trainer's answer to this round's feedback (`round_over`). Returns the newest
    round that trained (was not skipped) since `since` (the newest before this round's talk
    began), or None, and every round finished since then: one may have started while feedback
    was still arriving and taken part of it."""
    deadline = None if timeout is None else time.time() + timeout
    said = False
    while True:
        runs = [r for r in api.runs() if r["id"] > since and r["kind"] == "round"]
        if round_over(runs, after, PATIENCE if deadline is None else min(PATIENCE, deadline - time.time())):
            done = [r for r in runs if r["status"] in FINISHED]
            trained = [r for r in done if r["status"] != "skipped"]
            return (max(trained, key=lambda r: r["id"]) if trained else None), sorted(done, key=lambda r: r["id"])
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"no training round finished within {timeout:g}s; is the trainer running?")
        if not said:
            say("  waiting for the trainer's next round …")
            said = True
        time.sleep(1.0)


def wait_until_served(client, name: str, timeout: float) -> None:
    """Serving follows the registry by NOTIFY (and polling): wait until `name` answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if name in {m.id for m in client.models.list().data}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{name} is active in the registry but not served after {timeout:g}s")


def measure_served(api: Api, client, held: list[str], cfg: SimConfig, attempts: int = 3) -> tuple[dict, dict]:
    """(active version, its answers to the held-out prompts), all answered by that version: a
    promotion landing in the middle of a measurement means measuring again."""
    for _ in range(attempts):
        active = api.active_policy()
        wait_until_served(client, f"v{active['id']}", cfg.swap_timeout)
        sample = sample_heldout(client, held, cfg)
        served = {s["version"] for s in sample.values()}
        if served == {f"v{active['id']}"}:
            return active, sample
    raise RuntimeError(f"measured on {served}, but the registry's active policy is v{active['id']}")


def kl_of(version: dict) -> tuple[float, float]:
    """(this round's drift, the total drift) of a version as its gates measured them: KL per
    answer to its reference (its parent, re-anchored) and to the lineage's root; the root: 0, 0."""
    m = version.get("metrics", {})
    kl = float(m.get("gates/kl", 0.0) or 0.0)
    return kl, float(m.get("gates/kl_total", kl) or 0.0)


# --- output -----------------------------------------------------------------------------------------

def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_header(pref_names: list[str]) -> str:
    cols = "".join(f"  {n[:12]:>12} {'win':>5}" for n in pref_names)
    return (f"{'round':>5}  {'runs':>5}  {'status':<9}  {'gates':<6}  {'served':>6}{cols}  {'KL':>5}/{'budg':<4}  "
            f"{'total':>5}/{'budg':<4}  {'RM acc':>6}  {'gain':>6}  {'pairs':>5}  {'evnts':>5}  {'secs':>5}")


def table_row(row: dict, pref_names: list[str]) -> str:
    run = row.get("run") or {}
    gates = {"passed": "pass", "rejected": "reject", "not enough evidence yet": "wait"}.get(
        run.get("verdict"), {True: "pass", False: "reject", None: "-"}[run.get("gates_passed")])
    cols = "".join(f"  {row['preferences'][n]['score']:>12.3f} {row['preferences'][n]['win_rate']:>5.0%}"
                   + (f" ({row['preferences'][n]['win_vs_switch']:.0%})" if "win_vs_switch" in row['preferences'][n] else "")
                   for n in pref_names)
    trained = ",".join(str(r["id"]) for r in row.get("runs", []) if r["status"] != "skipped") or "-"
    return (f"{row['round']:>5}  {trained:>5}  {run.get('status', '-'):<9}  {gates:<6}  "
            f"{row['served_version']:>6}{cols}  {row['served_kl']:>5.2f}/{fmt(row.get('kl_budget'), '.1f'):<4}  "
            f"{row['served_kl_total']:>5.2f}/{fmt(row.get('total_kl_budget'), '.1f'):<4}  "
            f"{fmt(run.get('rm_accuracy'), '.2f'):>6}  {fmt(run.get('reward_gain'), '+.2f'):>6}  "
            f"{fmt(run.get('pairs'), 'd'):>5}  {fmt(run.get('new_events'), 'd'):>5}  {row['seconds']:>5.0f}")


def plot(result: dict, path: Path) -> None:
    """Score and win rate against the first version by round, one line per preference (and
    against the version served before a switch of taste, dashed); and the served version's drift:
    this round's (KL to its parent) and in total (KL to the root), beside the gates' budgets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = result["rounds"], result["config"]["preferences"]
    x = [r["round"] for r in rows]
    fig, (ax_score, ax_win, ax_kl) = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        ax_score.plot(x, [r["preferences"][name]["score"] for r in rows], marker="o", label=name)
        ax_win.plot(x, [r["preferences"][name]["win_rate"] for r in rows], marker="o", label=name)
        switched = [r for r in rows if "win_vs_switch" in r["preferences"][name]]
        if switched:
            ax_win.plot([r["round"] for r in switched], [r["preferences"][name]["win_vs_switch"] for r in switched],
                        marker="s", ls="--", label=f"{name} vs pre-switch version")
    for r in rows:  # which version served each measurement
        ax_win.annotate(r["served_version"], (r["round"], r["preferences"][names[0]]["win_rate"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax_kl.plot(x, [r["served_kl"] for r in rows], marker="o", color="tab:purple", label="per round (to parent)")
    ax_kl.plot(x, [r["served_kl_total"] for r in rows], marker="s", color="tab:orange", label="total (to root)")
    for key, color, label in (("kl_budget", "tab:purple", "round budget"), ("total_kl_budget", "tab:orange", "total budget")):
        budgets = [r[key] for r in rows if r.get(key) is not None]
        if budgets:
            ax_kl.axhline(budgets[-1], color=color, lw=1, ls="--", label=label)
    ax_score.set(title="hidden preference, served version (held-out prompts)", xlabel="round", ylabel="mean score")
    ax_win.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_win.set(title=f"win rate against {result['baseline']['version']} (ties half)", xlabel="round",
               ylabel="win rate", ylim=(0, 1))
    ax_kl.set(title="served version's drift, KL per answer (nats)", xlabel="round", ylabel="KL", ylim=(0, None))
    for ax in (ax_score, ax_win, ax_kl):
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


# --- the simulation --------------------------------------------------------------------------------

def run(cfg: SimConfig, say=print) -> dict:
    """Baseline, then `rounds` times: users chat and give feedback, the trainer's next round
    finishes, the served version is measured. Writes the JSON after every round and the plot."""
    rng = random.Random(cfg.seed)
    prefs = {name: resolve(name) for name in cfg.preferences}
    api = Api(cfg.url, cfg.api_key)
    api.wait_ready(cfg.ready_timeout)
    held = heldout_prompts()[:cfg.eval_prompts]
    prompts = user_prompts()
    tag = f"sim-{int(time.time())}"
    users = [User(name=f"{tag}-user{i}", preference_name=cfg.preferences[i % len(cfg.preferences)],
                  preference=prefs[cfg.preferences[i % len(cfg.preferences)]], key=api.create_key(f"{tag}-user{i}"),
                  rng=random.Random(f"{cfg.seed}:{i}")) for i in range(cfg.users)]
    evaluator = openai_client(cfg.url, api.create_key(f"{tag}-eval"))

    t0 = time.time()
    base = sample_heldout(evaluator, held, cfg)
    active = api.active_policy()
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "api_key"},
              "heldout_prompts": held,
              "baseline": {"version": next(iter(base.values()))["version"], "samples": base},
              "rounds": []}
    result["rounds"].append({
        "round": 0, "run": None, "runs": [], "served_version": result["baseline"]["version"],
        "served_version_id": active["id"] if active else None, **drift(active or {}, None, None),
        "preferences": measure(prefs, base, base), "feedback": {},
        "eval_response_ids": [s["response_id"] for s in base.values()], "seconds": time.time() - t0})
    pref_names = list(prefs)
    say(f"simulating {cfg.users} users ({', '.join(f'{n}' for n in pref_names)}; noise {cfg.noise:.0%}), "
        f"{cfg.requests_per_round} requests a round, measured on {len(held)} held-out prompts "
        f"x {cfg.eval_samples} answers against {result['baseline']['version']}")
    say("(score: mean hidden preference of the served version's answers; win: against "
        f"{result['baseline']['version']}, ties half; KL/budg: the served version's drift from its parent and the "
        "gates' per-round budget, nats; total/budg: from the first version and its budget; RM acc: the round's "
        "reward model on held-out pairs; gain: its reward gain over the active version; pairs: all it trained on; "
        "evnts: new feedback events it fired on; gates: pass, reject, or wait for more evidence)")
    say(table_header(pref_names))
    say(table_row(result["rounds"][0], pref_names))
    write_json(result, cfg.json_path)

    switch_base = None
    for k in range(1, cfg.rounds + 1):
        t0 = time.time()
        for f in prefs.values():
            if isinstance(f, Switching):
                if k == f.switch_round and switch_base is None:  # what users had taught until now
                    switch_base = sample_heldout(evaluator, held, cfg)
                    result["switch_baseline"] = {"round": k, "version": next(iter(switch_base.values()))["version"],
                                                 "samples": switch_base}
                    say(f"  tastes switch now: measured against {result['switch_baseline']['version']} too (in brackets)")
                f.at(k)
        since = max((r["id"] for r in api.runs(limit=1)), default=0)
        sent = chat_round(users, cfg, prompts, rng)
        after = max((r["id"] for r in api.runs(limit=1)), default=0)
        run_, runs = wait_for_round(api, since, after, cfg.round_timeout, say)
        active, sample = measure_served(api, evaluator, held, cfg)
        row = {"round": k, "run": summarise(run_) if run_ else None,
               "runs": [{"id": r["id"], "status": r["status"]} for r in runs],
               "served_version": f"v{active['id']}", "served_version_id": active["id"],
               **drift(active, run_, result["rounds"][-1]),
               "preferences": measure(prefs, sample, base, switch_base), "feedback": dict(sent),
               "eval_response_ids": [s["response_id"] for s in sample.values()],
               "samples": {p: s["answers"] for p, s in list(sample.items())[:8]},
               "seconds": time.time() - t0}
        result["rounds"].append(row)
        say(table_row(row, pref_names))
        if run_ and run_["status"] == "failed":
            say(f"  round {run_['id']} failed: {(run_.get('error') or '').strip().splitlines()[-1:]}")
        elif run_ and row["run"]["gates_passed"] is False:
            waits = row["run"]["verdict"] == "not enough evidence yet"  # its reasons say so
            say(f"  v{run_['produced_version_id']}{' not promoted' if waits else ' rejected'}: {'; '.join(row['run']['reasons'])}")
        write_json(result, cfg.json_path)
        if cfg.until_win_rate is not None and all(target_win_rate(prefs[n], m) >= cfg.until_win_rate
                                                  for n, m in row["preferences"].items()):
            say(f"every preference's win rate is at least {cfg.until_win_rate:.0%}: stopping")
            break
    plot(result, cfg.png_path)
    say(f"wrote {cfg.json_path} and {cfg.png_path}")
    return result


def target_win_rate(pref: Preference, measured: dict) -> float:
    """The win rate that says a preference is learnt: against the first version; for a switching
    one, against the version served before the switch (0 before it: the new taste is the goal)."""
    if isinstance(pref, Switching):
        return measured.get("win_vs_switch", 0.0)
    return measured["win_rate"]


def drift(version: dict, run: dict | None, previous: dict | None) -> dict:
    """The served version's drift, per round and in total, and the gates' budgets for them (the
    trained run's config, else the last row's)."""
    kl, total = kl_of(version)
    gates = (run or {}).get("config", {}).get("gates", {})
    return {"served_kl": kl, "served_kl_total": total,
            **{k: gates.get(k, (previous or {}).get(k)) for k in ("kl_budget", "total_kl_budget")}}


def summarise(run: dict) -> dict:
    """What the table and JSON keep of a training run (the full run stays in the database)."""
    m = run.get("metrics") or {}
    return {"id": run["id"], "status": run["status"], "trigger": run.get("trigger"),
            "produced_version_id": run.get("produced_version_id"), "gates_passed": m.get("gates/passed"),
            "verdict": m.get("gates/verdict"), "kl_total": m.get("gates/kl_total"), "new_events": m.get("data/new_events"),
            "reasons": m.get("gates/reasons") or [], "kl": m.get("gates/kl"),
            "rm_accuracy": m.get("reward/heldout_accuracy"), "reward_gain": m.get("gates/reward_gain"),
            "pairs": m.get("data/pairs"), "new_pairs": m.get("data/new_pairs"),
            "demonstrations": m.get("data/demonstrations")}


# --- command line ---------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SimConfig()
    p.add_argument("--url", default=d.url, help="the API's base URL")
    key = os.environ.get("FEEDLOOP_API_KEY") or os.environ.get("FEEDLOOP_INIT_API_KEY")
    p.add_argument("--api-key", required=not key, default=key,
                   help="an operator API key (default: $FEEDLOOP_API_KEY or $FEEDLOOP_INIT_API_KEY)")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--preference", action="append", dest="preferences", metavar="NAME",
                   help=f"hidden preference ({', '.join([*BUILTIN, *SWITCHING])}, before>after@round for tastes "
                        "that change, or module:function); repeat to mix; "
                        f"default {d.preferences[0]}")
    p.add_argument("--noise", type=float, default=d.noise, help="share of random or contrary votes")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--requests", type=int, default=d.requests_per_round, dest="requests_per_round",
                   help="chat requests per round, over all users")
    p.add_argument("--choices", default=",".join(map(str, d.choices)),
                   help="the n a request asks for, drawn per request (comma-separated)")
    p.add_argument("--correction-rate", type=float, default=d.correction_rate,
                   help="share of judged requests whose worst answer is corrected (becoming a demonstration)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="answers per held-out prompt")
    p.add_argument("--round-timeout", type=float, default=None, help="seconds to wait for a round")
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout,
                   help="seconds to wait for the API to be ready")
    p.add_argument("--until-win-rate", type=float, default=None,
                   help="stop early once every preference's win rate reaches this")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default=str(d.json_path), dest="json_path")
    p.add_argument("--png", default=str(d.png_path), dest="png_path")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(url=args.url, api_key=args.api_key, users=args.users,
                     preferences=args.preferences or SimConfig().preferences, noise=args.noise,
                     rounds=args.rounds, requests_per_round=args.requests_per_round,
                     choices=[int(c) for c in args.choices.split(",")], eval_samples=args.eval_samples,
                     correction_rate=args.correction_rate,
                     round_timeout=args.round_timeout, ready_timeout=args.ready_timeout,
                     until_win_rate=args.until_win_rate, seed=args.seed, json_path=Path(args.json_path),
                     png_path=Path(args.png_path))


def main(args: argparse.Namespace) -> None:
    for name in ("httpx", "httpx2", "openai"):  # one line per request would bury the table
        logging.getLogger(name).setLevel(logging.WARNING)
    from openai import APIError
    try:
        run(config_from_args(args), say=lambda s: print(s, flush=True))
    except (ValueError, TimeoutError, RuntimeError, httpx.HTTPError, APIError) as e:
        sys.exit(f"feedloop simulate: {e}")
