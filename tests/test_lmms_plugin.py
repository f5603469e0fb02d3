"""The lmms-eval plugin through lmms-eval's own CLI and evaluator: two local tasks (written here, under
--include_path) over world videos, one generate_until (batched) and one multiple_choice (loglikelihood).
Predictions are checked against the engine run directly on the same prompts; nothing is downloaded."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("av")

TASK = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {name}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}
metadata:
  - version: 0.0
"""
GEN = """\
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true"""
MC = """\
process_docs: !function utils.multiple_choice_only
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
target_delimiter: ""
metric_list:
  - metric: acc"""
UTILS = """\
from tokensieve.eval.videoqa.answers import score
from tokensieve.eval.videoqa.readers import Sample


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    sample = Sample(doc["id"], doc["video"], doc["question"], doc["options"] or [], doc["answer"])
    return {"accuracy": float(score(sample, results[0])[1])}


def multiple_choice_only(dataset):
    return dataset.filter(lambda d: bool(d["options"]))


def doc_to_choice(doc):
    return [o.split(".")[0] for o in doc["options"]]


def doc_to_target(doc):
    return doc_to_choice(doc).index(doc["answer"])
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from tokensieve.eval.shapeworld import dataset

    root = tmp_path_factory.mktemp("lmms")
    path = dataset.write_dataset(str(root / "world"), n_images=0, n_videos=3, seed=20_000, mc_fraction=0.5, progress=False)
    rows = [json.loads(line) for line in open(path)]
    data = root / "tasks" / "data.jsonl"
    data.parent.mkdir()
    with open(data, "w") as f:
        for r in rows:
            r["video"] = os.path.join(os.path.dirname(path), r["video"])
            r["options"] = r["options"] or []
            f.write(json.dumps(r) + "\n")
    (data.parent / "utils.py").write_text(UTILS)
    for name, kind, extra in (("tsworld_gen", "generate_until", GEN), ("tsworld_mc", "multiple_choice", MC)):
        (data.parent / f"{name}.yaml").write_text(TASK.format(data=data, name=name, output_type=kind, extra=extra))
    return data.parent, rows


def test_lmms_eval_runs_the_plugin_on_local_tasks(task_dir, tmp_path):
    import tokensieve

    folder, rows = task_dir
    model = tokensieve.default_model()  # the shipped tiny LLaVA: its vocabulary has the option letters
    plan = "uniform:keep=0.5"
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "tokensieve",
           "--model_args", f'model={model},plan="{plan}",nframes=4',
           "--tasks", "tsworld_gen,tsworld_mc", "--include_path", str(folder), "--batch_size", "2",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    logged = {}  # lmms-eval exits 0 even when the run fails: what it logged is the test
    for dirpath, _, files in os.walk(out):
        for name in files:
            if name.endswith(".jsonl") and "_samples_" in name:
                task = next(t for t in ("tsworld_gen", "tsworld_mc") if t in name)
                logged[task] = sorted((json.loads(line) for line in open(os.path.join(dirpath, name))),
                                      key=lambda s: s["doc_id"])
    assert set(logged) == {"tsworld_gen", "tsworld_mc"}, proc.stderr[-6000:]
    gen, mc = logged["tsworld_gen"], logged["tsworld_mc"]
    mc_rows = [r for r in rows if r["options"]]
    assert len(gen) == len(rows) and len(mc) == len(mc_rows) > 0

    engine = tokensieve.load(model, plan=plan)
    try:
        for s, r in zip(gen, rows):  # the plugin's answers are the engine's, for the same prompt, video and plan
            direct = engine.generate(r["question"], video={"path": r["video"], "nframes": 4}, max_new_tokens=6)
            assert s["input"] == r["question"] and s["filtered_resps"].strip() == direct.text
        for s, r in zip(mc, mc_rows):  # loglikelihood: per option letter, the engine's log-probability
            video = {"path": r["video"], "nframes": 4}
            want = [engine.loglikelihood(r["question"], o.split(".")[0], video=video) for o in r["options"]]
            got = [(float(ll), greedy == "True") for ll, greedy in s["filtered_resps"]]
            assert [g for _, g in got] == [g for _, g in want]
            assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-3)
            assert len({round(ll, 3) for ll, _ in want}) > 1  # the letters are told apart
    finally:
        engine.close()


def test_plugin_methods_on_image_documents_and_multi_round(tmp_path):
    """generate_until on image documents (batched), and generate_until_multi_round, called as lmms-eval calls
    them, against the engine on the same prompts."""
    import random

    from lmms_eval.api.instance import Instance

    import tokensieve
    from tokensieve.eval.videoqa.lmms_plugin import TokenSieve
    from tokensieve.eval.shapeworld import world

    rng = random.Random(5)
    docs = [{"image": world.render(world.random_scene(rng)), "question": q}
            for q in ("what colour is the circle ?", "how many objects are there ?", "is there a red square ?")]
    model = TokenSieve(plan="uniform:keep=0.5", batch_size=2)
    model.task_dict = {"world": {"test": docs}}

    def to_visual(doc):
        return [doc["image"]]

    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n"]}
    def meta(i):
        return {"task": "world", "doc_id": i, "repeats": 1}

    reqs = [Instance("generate_until", (d["question"], dict(gen), to_visual, i, "world", "test"), idx=0, metadata=meta(i))
            for i, d in enumerate(docs)]
    got = model.generate_until(reqs)
    engine = tokensieve.load(plan="uniform:keep=0.5")
    want = [engine.generate(d["question"], images=[d["image"]], max_new_tokens=4).text for d in docs]
    assert got == want

    def next_round(doc, previous_output, round_idx, previous_round_info):
        """Round 1 asks again with the first answer in the prompt; round 2 ends."""
        done = round_idx >= 2
        return [doc["image"]], f"{doc['question']} {previous_output[-1]}", done, previous_output, None

    multi = [Instance("generate_until_multi_round", (docs[0]["question"], dict(gen), to_visual, next_round, 0,
                                                     "world", "test"), idx=0, metadata=meta(0))]
    rounds = model.generate_until_multi_round(multi)[0]
    first = engine.generate(docs[0]["question"], images=[docs[0]["image"]], max_new_tokens=4).text
    second = engine.generate(f"{docs[0]['question']} {first}", images=[docs[0]["image"]], max_new_tokens=4).text
    assert rounds == [first, second]
    engine.close()
    model.clean()
