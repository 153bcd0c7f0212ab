"""Synthetic learner errors for augmenting CGEC training data, seeded and reproducible.

Six kinds of error, each a small, explicit rule (not a model): similar-pinyin character substitution (same toneless
syllable among the 3755 common GB2312 level-1 characters), similar-shape substitution (a curated table of look-alike
characters), a missing function word, a redundant function word, a swap of two adjacent short spans (word order),
and a collocation slip (a verb or measure word replaced by a commonly confused one). A sentence gets 1..3 edits with
configurable probabilities; :func:`noise_stats` reports what was applied.
"""

from __future__ import annotations

import functools
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from pypinyin import Style, lazy_pinyin

FUNCTION_WORDS = (
    "的",
    "地",
    "得",
    "了",
    "着",
    "过",
    "在",
    "把",
    "被",
    "和",
    "与",
    "对",
    "于",
    "是",
    "也",
    "都",
    "就",
    "才",
    "又",
    "很",
    "最",
    "从",
    "向",
    "给",
    "让",
    "使",
    "所",
    "以",
    "而",
    "并",
)
SHAPE_GROUPS = (
    "己已巳",
    "未末",
    "人入八",
    "土士",
    "日曰",
    "戊戌戍",
    "拨拔",
    "侯候",
    "辨辩辫瓣",
    "赢嬴",
    "崇祟",
    "析折",
    "壁璧",
    "睛晴清情请",
    "蓝篮",
    "象像",
    "做作",
    "即既",
    "历厉",
    "副幅福富",
    "练炼",
    "籍藉",
    "暴瀑爆",
    "竞竟",
    "刺剌",
    "免兔",
    "贷货",
    "狼狠",
    "往住",
    "治冶",
    "徒徙",
    "汩汨",
    "候喉",
    "栽裁载",
    "辛幸",
    "钓钩",
    "抓爪",
    "问间",
    "休体",
    "予矛",
    "千干于",
    "太大犬",
    "王玉主",
    "口日",
    "准淮",
    "今令",
    "人八",
    "天夭",
    "失矢",
    "处外",
    "复夏",
    "微徽",
    "旱旦",
    "理埋",
    "撤撒",
    "峰锋蜂烽",
    "沾粘",
    "梁粱",
)
COLLOCATIONS = (
    ("提高", "增加"),
    ("发挥", "发扬"),
    ("改善", "改进"),
    ("交流", "交换"),
    ("进行", "开展"),
    ("培养", "培育"),
    ("增强", "加强"),
    ("扩大", "放大"),
    ("解决", "处理"),
    ("达到", "到达"),
    ("影响", "印象"),
    ("关心", "关怀"),
    ("发现", "发明"),
    ("了解", "理解"),
    ("充满", "充足"),
    ("个", "只"),
    ("条", "根"),
    ("张", "片"),
    ("本", "部"),
    ("件", "个"),
    ("位", "名"),
    ("座", "所"),
)
KINDS = ("pinyin_sub", "shape_sub", "missing_function_word", "redundant_function_word", "word_order", "collocation")


@functools.lru_cache(maxsize=1)
def _common_chars() -> tuple[str, ...]:
    """GB2312 level-1 characters (rows 16-55): the 3755 most common simplified characters."""
    chars = []
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                continue
    return tuple(chars)


@functools.lru_cache(maxsize=1)
def _by_sound() -> dict[str, tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    for ch in _common_chars():
        groups.setdefault(lazy_pinyin(ch, style=Style.NORMAL)[0], []).append(ch)
    return {k: tuple(v) for k, v in groups.items()}


@functools.lru_cache(maxsize=1)
def _by_shape() -> dict[str, str]:
    return {ch: group for group in SHAPE_GROUPS for ch in group}


def _is_han(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


@dataclass
class NoiseConfig:
    """Probabilities of 1, 2, 3 edits per sentence and the relative weight of each kind."""

    edits_per_sentence: tuple[float, float, float] = (0.6, 0.3, 0.1)
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "pinyin_sub": 0.3,
            "shape_sub": 0.1,
            "missing_function_word": 0.2,
            "redundant_function_word": 0.15,
            "word_order": 0.1,
            "collocation": 0.15,
        }
    )


class NoiseGenerator:
    """``NoiseGenerator(seed).corrupt(sentence) -> (noisy, [kinds applied])``; same seed, same output."""

    def __init__(self, seed: int = 0, config: NoiseConfig | None = None):
        self.rng = random.Random(seed)
        self.config = config or NoiseConfig()

    def corrupt(self, sentence: str) -> tuple[str, list[str]]:
        n = self.rng.choices((1, 2, 3), weights=self.config.edits_per_sentence)[0]
        kinds = list(self.config.weights)
        applied: list[str] = []
        text = sentence
        for attempt in range(n + 3):
            if attempt >= n and text != sentence:
                break  # later edits can undo earlier ones (a swap swapped back): add one until the text differs
            order = self.rng.choices(kinds, weights=[self.config.weights[k] for k in kinds], k=len(kinds))
            for kind in order + kinds:  # fall back to any kind that applies
                new = getattr(self, "_" + kind)(text)
                if new is not None and new != text:
                    text = new
                    applied.append(kind)
                    break
        return text, applied

    def _positions(self, text: str, test) -> list[int]:
        return [i for i, ch in enumerate(text) if test(ch)]

    def _pinyin_sub(self, text: str) -> str | None:
        spots = [i for i in self._positions(text, _is_han) if len(_by_sound().get(lazy_pinyin(text[i])[0], ())) > 1]
        if not spots:
            return None
        i = self.rng.choice(spots)
        options = [c for c in _by_sound()[lazy_pinyin(text[i])[0]] if c != text[i]]
        return text[:i] + self.rng.choice(options) + text[i + 1 :]

    def _shape_sub(self, text: str) -> str | None:
        spots = self._positions(text, lambda ch: ch in _by_shape())
        if not spots:
            return None
        i = self.rng.choice(spots)
        options = [c for c in _by_shape()[text[i]] if c != text[i]]
        return text[:i] + self.rng.choice(options) + text[i + 1 :]

    def _missing_function_word(self, text: str) -> str | None:
        spots = self._positions(text, lambda ch: ch in FUNCTION_WORDS)
        if not spots:
            return None
        i = self.rng.choice(spots)
        return text[:i] + text[i + 1 :]

    def _redundant_function_word(self, text: str) -> str | None:
        spots = [i for i in range(1, len(text)) if _is_han(text[i - 1]) and _is_han(text[i])]
        if not spots:
            return None
        i = self.rng.choice(spots)
        return text[:i] + self.rng.choice(FUNCTION_WORDS) + text[i:]

    def _word_order(self, text: str) -> str | None:
        spans = []
        for i in range(len(text)):
            for a in (1, 2):
                for b in (1, 2):
                    seg = text[i : i + a + b]
                    if len(seg) == a + b and all(_is_han(c) for c in seg) and seg[:a] != seg[a:]:
                        spans.append((i, a, b))
        if not spans:
            return None
        i, a, b = self.rng.choice(spans)
        return text[:i] + text[i + a : i + a + b] + text[i : i + a] + text[i + a + b :]

    def _collocation(self, text: str) -> str | None:
        hits = [(w, r) for a, b in COLLOCATIONS for w, r in ((a, b), (b, a)) if w in text]
        if not hits:
            return None
        w, r = self.rng.choice(hits)
        starts = [i for i in range(len(text)) if text.startswith(w, i)]
        i = self.rng.choice(starts)
        return text[:i] + r + text[i + len(w) :]


def noise_stats(applied: list[list[str]]) -> dict:
    """Distribution of what :meth:`NoiseGenerator.corrupt` applied over many sentences."""
    kinds = Counter(k for edits in applied for k in edits)
    per = Counter(len(edits) for edits in applied)
    total = sum(kinds.values())
    return {
        "sentences": len(applied),
        "edits": total,
        "edits_per_sentence": {str(k): per[k] for k in sorted(per)},
        "mean_edits_per_sentence": round(total / max(len(applied), 1), 3),
        "kinds": {k: kinds.get(k, 0) for k in KINDS},
        "kind_share": {k: round(kinds.get(k, 0) / max(total, 1), 3) for k in KINDS},
    }
