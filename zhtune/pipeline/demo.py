"""``zhtune demo``: the whole pipeline on a laptop, offline, on CPU, in minutes, with numbers that mean something.

Everything is made here from text that ships with the package. Correct Chinese sentences are composed from small word
lists; the tokenizer gives one token per character (as CGEC scores edits per character, every learner error
the noise makes is then a change of a few tokens); a tiny Qwen2-architecture model is pre-trained on those
sentences and on copying them under an instruction, because a corrector is first of all a copier. An instruction set
is made from simple tasks on the sentences, a CGEC set by corrupting other sentences with :mod:`zhtune.gec.noise`
(the error kinds a model of this size can learn from the word lists: similar-sound and similar-shape characters,
missing and redundant function words, swapped words). Then the embedded pipeline recipe runs: instruction LoRA →
merge → CGEC LoRA → merge → CGEC evaluation of the final, base and stage-1 models on held-out sentences never seen in
training → report. The base, a language model of correct sentences asked to copy, already repairs some errors by
accident; the gain in F0.5 the report shows is what the CGEC LoRA learned on top (tests/pipeline/test_pipeline.py
requires at least 0.25 on the test set, with over-correction below 0.5, in under 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

PEOPLE = ("我", "他", "她", "我们", "老师", "妈妈", "爸爸", "同学们", "小明", "小红", "医生", "我的朋友", "哥哥")
TIMES = ("今天", "昨天", "明天", "周末", "早上", "晚上", "下午", "每天", "上个月", "去年")
PLACES = ("学校", "公园", "图书馆", "超市", "北京", "家里", "医院", "电影院", "海边", "操场", "饭店", "书店", "花园")
ACTIVITIES = (
    "看书",
    "买东西",
    "散步",
    "学习中文",
    "打篮球",
    "看电影",
    "吃饭",
    "写作业",
    "唱歌",
    "休息",
    "画画",
    "游泳",
    "跑步",
)
FEELINGS = ("很高兴", "非常累", "有点紧张", "特别开心", "很满意", "有些担心", "很感动")
PUNCTUATION = "。，、；：？！“”‘’（）《》…—·"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REPEAT = "复述下面的句子。"
COUNT = "这句话有几个字？"
WHERE = "这句话提到了哪个地方？"
CONFUSABLES = "再坐座那哪它吗么"
# the learner errors of this demo (zhtune.gec.noise kinds) and how often each is drawn
NOISE_WEIGHTS = {
    "pinyin_sub": 0.35,
    "shape_sub": 0.1,
    "missing_function_word": 0.25,
    "redundant_function_word": 0.2,
    "word_order": 0.1,
}


def demo_sentences(n: int = 3200, seed: int = 0) -> list[str]:
    """Correct, varied, short sentences composed from the word lists above, all different."""
    rng = random.Random(seed)
    patterns = (
        lambda: f"{rng.choice(PEOPLE)}{rng.choice(TIMES)}在{rng.choice(PLACES)}{rng.choice(ACTIVITIES)}。",
        lambda: f"{rng.choice(TIMES)}{rng.choice(PEOPLE)}去{rng.choice(PLACES)}{rng.choice(ACTIVITIES)}了。",
        lambda: f"{rng.choice(PEOPLE)}在{rng.choice(PLACES)}{rng.choice(ACTIVITIES)}以后{rng.choice(FEELINGS)}。",
        lambda: f"因为{rng.choice(TIMES)}要{rng.choice(ACTIVITIES)}，所以{rng.choice(PEOPLE)}{rng.choice(FEELINGS)}。",
        lambda: f"{rng.choice(PEOPLE)}把作业做完了，然后和{rng.choice(PEOPLE)}一起{rng.choice(ACTIVITIES)}。",
        lambda: f"{rng.choice(PEOPLE)}说{rng.choice(PLACES)}很好，{rng.choice(TIMES)}还想去{rng.choice(ACTIVITIES)}。",
    )
    seen, out = set(), []
    while len(out) < n:
        s = rng.choice(patterns)()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def demo_alphabet(sentences: list[str]) -> set[str]:
    """The characters the demo's learner errors may use: those of the sentences, the function words, a few common
    confusables, and the look-alike groups that share a character with the sentences. Keeping the noise inside this
    alphabet keeps the vocabulary (and so the CPU time) small while the errors stay the real kinds: similar-sound
    characters here are homophones of the demo's own (他/她, 的/得, 在/再, 做/作, 点/店 ...)."""
    from zhtune.gec.noise import FUNCTION_WORDS, SHAPE_GROUPS

    alphabet = set("".join(sentences)) | set("".join(FUNCTION_WORDS)) | set(CONFUSABLES)
    return alphabet | {c for group in SHAPE_GROUPS if set(group) & alphabet for c in group}


def demo_characters(sentences: list[str]) -> list[str]:
    """The tokenizer's characters: the alphabet, the instructions' characters, ASCII, Chinese punctuation."""
    from zhtune.gec.corpora import CGEC_INSTRUCTION

    text = CGEC_INSTRUCTION + REPEAT + COUNT + WHERE + "这句话有个字不知道你是一个中文助手0123456789"
    text += PUNCTUATION + "".join(chr(c) for c in range(32, 127)) + "\n"
    return sorted(demo_alphabet(sentences) | set(text))


def corrupt_within(noise, sentence: str, alphabet: set[str], tries: int = 30) -> str:
    """A corruption of ``sentence`` by ``noise`` that uses only ``alphabet`` (the first of ``tries`` that does; a
    missing function word, which always does, when none)."""
    for _ in range(tries):
        noisy, _kinds = noise.corrupt(sentence)
        if noisy != sentence and set(noisy) <= alphabet:
            return noisy
    return noise._missing_function_word(sentence) or sentence


def build_tokenizer(sentences: list[str], out: Path):
    """A byte-level BPE tokenizer (as Qwen's) whose merges only ever join the bytes of one character, so that every
    character of the demo is exactly one token; ChatML special tokens (``<|im_end|>`` ends a turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # one character per training text: no merge can cross a character boundary (UTF-8 lead and continuation bytes
    # differ), and every character's bytes merge into one token
    tok.train_from_iterator([c for c in demo_characters(sentences) for _ in range(4)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    fast.save_pretrained(out)
    return fast


def _copy_ids(tokenizer, sentence: str, instruction: str) -> list[int]:
    """A ChatML conversation asking to repeat (or correct) a correct sentence, answered with the sentence."""
    text = f"<|im_start|>user\n{instruction}\n{sentence}<|im_end|>\n<|im_start|>assistant\n{sentence}<|im_end|>"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_model(tokenizer, sentences: list[str], out: Path, seed: int = 0, steps: int = 500) -> None:
    """A tiny Qwen2 model pre-trained (all weights) to be a language model of the demo sentences and to copy a
    sentence it is given, under the repeat and the correction instruction alike: the base of a corrector."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from zhtune.gec.corpora import CGEC_INSTRUCTION

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        # the whole conversation is language-modelled: the template, the sentence in the prompt, its copy
        rows = [_copy_ids(tokenizer, s, rng.choice((REPEAT, CGEC_INSTRUCTION))) for s in rng.sample(sentences, 32)]
        width = max(len(ids) for ids in rows)
        batch = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            batch[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
        loss = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.save_pretrained(out)


def build_data(sentences: list[str], out: Path, seed: int = 0) -> dict[str, Path]:
    """The instruction set, and CGEC train/dev/test pairs made from disjoint sentences (a quarter left correct, so
    that over-correction is measured and copying stays learned)."""
    from zhtune.gec.noise import NoiseConfig, NoiseGenerator

    rng = random.Random(seed)
    instruct = []
    for s in sentences[:400]:
        task = rng.choice(("repeat", "count", "where"))
        if task == "repeat":
            instruct.append({"instruction": REPEAT, "input": s, "output": s})
        elif task == "count":
            instruct.append({"instruction": COUNT, "input": s, "output": f"这句话有{len(s)}个字。"})
        else:
            place = next((p for p in PLACES if p in s), "不知道")
            instruct.append({"instruction": WHERE, "input": s, "output": place})
    (out / "instruct.json").write_text(json.dumps(instruct, ensure_ascii=False, indent=1), encoding="utf-8")
    noise = NoiseGenerator(seed, NoiseConfig(edits_per_sentence=(0.75, 0.25, 0.0), weights=dict(NOISE_WEIGHTS)))
    alphabet = demo_alphabet(sentences)
    pairs = [
        (f"d{i}", s if i % 4 == 3 else corrupt_within(noise, s, alphabet), s) for i, s in enumerate(sentences[400:])
    ]
    splits = {"train": pairs[:-160], "dev": pairs[-160:-100], "test": pairs[-100:]}
    files = {"instruct": out / "instruct.json"}
    for name, rows in splits.items():
        para = out / f"cgec_{name}.para"
        para.write_text("".join(f"{i}\t{src}\t{ref}\n" for i, src, ref in rows), encoding="utf-8")
        files[f"cgec_{name}"] = para
        if name != "train":
            src_file = out / f"cgec_{name}.src.txt"
            src_file.write_text("".join(f"{i}\t{src}\n" for i, src, _ref in rows), encoding="utf-8")
            files[f"cgec_{name}_src"] = src_file
    return files


def demo_pipeline(base: Path, files: dict[str, Path], work: Path) -> dict:
    """The embedded pipeline recipe (instruction LoRA → merge → CGEC LoRA → merge → evaluation)."""
    common_train = {
        "micro_batch_size": 8,
        "grad_accum": 1,
        "warmup_steps": 10,
        "save_every": 100,
        "eval_every": 100,
        "val_size": 16,
        "seed": 1,
    }
    model = {"dtype": "fp32", "gradient_checkpointing": False, "attn_implementation": "sdpa"}
    lora = {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": "auto"}
    return {
        "base": str(base),
        "work_dir": str(work),
        "template": "qwen",
        "system": "你是一个中文助手。",
        "stages": [
            {
                "name": "instruct",
                "kind": "sft",
                "recipe": {
                    "model": model,
                    "data": {"paths": [str(files["instruct"])]},
                    "tokenize": {"cutoff_len": 128},
                    "lora": lora,
                    "train": {**common_train, "lr": 5e-3, "max_steps": 100},
                },
            },
            {"name": "merge_instruct", "kind": "merge"},
            {
                "name": "cgec",
                "kind": "sft",
                "recipe": {
                    "model": model,
                    "data": {"paths": [str(files["cgec_train"])], "format": "cgec"},
                    "tokenize": {"cutoff_len": 128},
                    "lora": lora,
                    "train": {**common_train, "micro_batch_size": 16, "lr": 1e-2, "max_steps": 500},
                    "eval": {"cgec": {"data": str(files["cgec_dev"]), "every": 250, "limit": 24, "batch_size": 24}},
                },
            },
            {"name": "merge_cgec", "kind": "merge"},
            {
                "name": "evaluate",
                "kind": "eval_cgec",
                "compare": ["base", "merge_instruct"],
                "batch_size": 50,
                "sets": [
                    {"name": "demo_test", "input": str(files["cgec_test_src"]), "ref": str(files["cgec_test"])},
                    {"name": "demo_dev", "input": str(files["cgec_dev_src"]), "ref": str(files["cgec_dev"])},
                ],
            },
        ],
    }


def prepare_demo(out: Path) -> Path:
    """Build (once) the demo's model, tokenizer, data and pipeline recipe under ``out``; return the recipe path."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "pipeline.yaml"
    if recipe.exists():
        return recipe
    sentences = demo_sentences()
    base, data = out / "base-model", out / "data"
    data.mkdir(exist_ok=True)
    tokenizer = build_tokenizer(sentences, base)
    build_model(tokenizer, sentences[:400] + sentences[400:-160], base)  # never the dev and test sentences
    files = build_data(sentences, data)
    recipe.write_text(
        yaml.safe_dump(demo_pipeline(base, files, out / "run"), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    return recipe
