"""Offline "books" with planted facts for the QA and multiple-choice tasks.

A book is filler text with many fact sentences (entity, attribute, value) spread through it, one fact
per invented person. A few facts are asked about; the others are distractors from the same attribute
spaces, so the answer cannot be guessed without finding the right sentence. English filler is the
prose of the CPython language reference (tasks/material.py); Chinese filler is synthetic narrative
built from the sentence templates below (no Chinese book ships with Python).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from scbench.tasks.base import TokenCounter, fit_length
from scbench.tasks.material import SOURCE_DOCS, paragraphs


@dataclass(frozen=True)
class Attribute:
    fact: str
    question: str
    values: tuple[str, ...]


def _years() -> tuple[str, ...]:
    return tuple(str(y) for y in range(1901, 2000))


EN_FIRST = ("Ilse Mara Tobias Wren Odile Caspian Nadia Bertil Leonie Anselm Petra Ignatius Saskia Emeric Linnea "
            "Dorian Greta Oskar Talia Casimir Vera Hamish Ottilie Florian Maren Cyril Elodie Rasmus Inka Tiberius").split()
EN_LAST = ("Varga Holloway Brandt Okafor Lindqvist Moreau Castellan Petrescu Achterberg Nakamura Quill Rasmussen "
           "Delacroix Whitcombe Szabo Marchetti Falkner Ostrowski Eriksen Thibault Vance Kowalczyk Ferreira Halvorsen").split()
EN_ATTRIBUTES = (
    Attribute("{name} moved to {value} many years ago and still lives there.", "In which city does {name} live?",
              tuple("Tallinn Porto Bergen Ljubljana Valparaiso Hobart Tromso Cusco Gdansk Windhoek Aarhus Lyon Quito "
                    "Tbilisi Dunedin Bratislava Halifax Salzburg Krakow Zanzibar Leipzig Antwerp Bilbao Turku".split())),
    Attribute("{name}'s job title is {value}.", "What is {name}'s job title?",
              ("harbor pilot", "glassblower", "tax auditor", "bookbinder", "beekeeper", "cartographer", "stonemason",
               "piano tuner", "sommelier", "locksmith", "taxidermist", "lighthouse keeper", "perfumer", "clockmaker",
               "court stenographer", "falconer", "puppeteer", "surveyor", "blacksmith", "typesetter")),
    Attribute("In the evenings, {name} plays the {value}.", "Which instrument does {name} play in the evenings?",
              ("cello", "oboe", "bassoon", "harpsichord", "mandolin", "sitar", "banjo", "tuba", "accordion", "viola",
               "harp", "clarinet", "bagpipes", "marimba", "trombone", "ukulele", "zither", "dulcimer")),
    Attribute("{name} has a cat named {value}.", "What is the name of {name}'s cat?",
              tuple("Biscuit Pumpkin Mochi Waffles Juniper Pickle Noodle Clementine Marmalade Pretzel Truffle Ziggy "
                    "Paprika Sprocket Dumpling Nutmeg Gizmo Tofu Cobweb Muffin".split())),
    Attribute("{name} was born in {value}.", "In which year was {name} born?", _years()),
)

ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹")
ZH_GIVEN = ("子涵 雨桐 浩然 思远 若曦 嘉怡 俊杰 欣怡 博文 静怡 明轩 诗涵 宇航 晓峰 梦琪 天佑 佳琪 志强 婉清 文博 "
            "一鸣 清扬 书瑶 景行 沐阳 语嫣 泽宇 海燕 春生 秋月").split()
ZH_ATTRIBUTES = (
    Attribute("{name}多年前搬到了{value}，至今仍住在那里。", "{name}住在哪个城市？",
              tuple("杭州 苏州 成都 西安 南京 厦门 青岛 昆明 大连 武汉 长沙 郑州 济南 合肥 福州 贵阳 兰州 宁波 无锡 桂林 洛阳 扬州 绍兴 泉州".split())),
    Attribute("{name}的职业是{value}。", "{name}的职业是什么？",
              tuple("木匠 会计师 兽医 邮递员 建筑师 药剂师 图书管理员 摄影师 厨师 翻译 园艺师 钟表匠 消防员 裁缝 渔夫 陶艺师 律师 护士 飞行员 地质学家".split())),
    Attribute("每天晚上，{name}都会演奏{value}。", "{name}每天晚上演奏什么乐器？",
              tuple("二胡 古筝 琵琶 笛子 钢琴 小提琴 大提琴 手风琴 萨克斯 竖琴 扬琴 唢呐 吉他 长笛 单簧管".split())),
    Attribute("{name}养了一只名叫{value}的猫。", "{name}养的猫叫什么名字？",
              tuple("豆豆 球球 花花 咪咪 团子 雪球 年糕 芝麻 布丁 可乐 橘子 馒头 汤圆 饺子 奶茶 黑豆".split())),
    Attribute("{name}出生于{value}年。", "{name}出生于哪一年？", _years()),
)
ZH_TEMPLATES = (
    "{time}，{place}下起了{weather}，街上的行人都加快了脚步。",
    "{place}的{thing}在{time}显得格外安静。",
    "人们常说，{place}最美的时候是{time}。",
    "{time}，有人在{place}附近的茶馆里谈论着{topic}。",
    "沿着{place}的小路一直往前走，可以看到一片{scene}。",
    "那一年，{place}的{thing}比往年更加热闹。",
    "老人们回忆起{topic}，总是忍不住叹气。",
    "{weather}过后，{place}的空气变得清新起来。",
    "孩子们在{scene}旁边追逐打闹，一直玩到{time}。",
    "关于{topic}的故事，在{place}流传了很多年。",
)
ZH_SLOTS = {
    "time": "清晨 傍晚 深夜 正午 黄昏 初春 盛夏 深秋 寒冬 节日前夕".split(),
    "place": "小镇 河边 山脚下 老街 码头 集市 村口 车站 湖畔 古城墙".split(),
    "weather": "小雨 大雪 冰雹 细雨 阵雨 雷雨".split(),
    "thing": "石桥 钟楼 书店 菜市场 老槐树 渡船 灯塔 祠堂".split(),
    "topic": "当年的洪水 远方的亲戚 丰收的季节 修桥的工匠 失落的地图 过去的戏班".split(),
    "scene": "稻田 竹林 荷塘 果园 芦苇丛 油菜花田".split(),
}
SOURCES = {"en": SOURCE_DOCS + " as filler with seeded planted facts",
           "zh": "synthetic Chinese narrative (templates in tasks/facts.py) with seeded planted facts"}


@dataclass(frozen=True)
class Fact:
    name: str
    attribute: Attribute
    value: str

    @property
    def sentence(self) -> str:
        return self.attribute.fact.format(name=self.name, value=self.value)

    @property
    def question(self) -> str:
        return self.attribute.question.format(name=self.name)


def _filler(rng: random.Random, lang: str, n: int) -> list[str]:
    if lang == "en":
        paras = paragraphs()
        start = rng.randrange(len(paras))
        return [paras[(start + i) % len(paras)] for i in range(n)]
    out = []
    for _ in range(n):
        sentences = [rng.choice(ZH_TEMPLATES).format(**{k: rng.choice(v) for k, v in ZH_SLOTS.items()})
                     for _ in range(rng.randint(4, 8))]
        out.append("".join(sentences))
    return out


def build_book(rng: random.Random, length: int, count: TokenCounter, n_asked: int, lang: str = "en"
               ) -> tuple[str, list[Fact], list[Fact]]:
    """(book text of about ``length`` tokens, the asked facts, every planted fact)."""
    first, last, attributes = (EN_FIRST, EN_LAST, EN_ATTRIBUTES) if lang == "en" else (ZH_SURNAMES, ZH_GIVEN, ZH_ATTRIBUTES)
    join = " " if lang == "en" else ""
    n_facts = max(3 * n_asked, min(600, length // 150))
    people = rng.sample([a + join + b for a in first for b in last], min(n_facts, len(first) * len(last)))
    if len(people) < n_asked:
        raise ValueError(f"at most {len(people)} questions per book")
    kinds = [attributes[i % len(attributes)] for i in range(len(people))]
    facts = [Fact(p, a, rng.choice(a.values)) for p, a in zip(people, kinds)]
    rng.shuffle(facts)
    sentences = [f.sentence for f in facts]
    budget = length - sum(count(s + "\n\n") for s in sentences)
    pool = _filler(rng, lang, max(8, length // (40 if lang == "en" else 15)))
    seed = rng.getrandbits(32)

    def build(n: int) -> str:
        r = random.Random(seed)
        paras = list(pool[:n])
        for s in sentences:
            paras.insert(r.randint(0, len(paras)), s)
        return "\n\n".join(paras)

    n, _ = fit_length(lambda n: "\n\n".join(pool[:n]), max(budget, 1), count, start=max(1, budget // 120))
    return build(n), facts[:n_asked], facts


def options_for(rng: random.Random, fact: Fact, facts: list[Fact], k: int = 4) -> list[str]:
    """``k`` shuffled options: the answer and values of the same attribute, those in the book first."""
    seen = [f.value for f in facts if f.attribute is fact.attribute and f.value != fact.value]
    others = list(dict.fromkeys(rng.sample(seen, len(seen)) + rng.sample(fact.attribute.values, len(fact.attribute.values))))
    options = [fact.value] + [v for v in others if v != fact.value][: k - 1]
    rng.shuffle(options)
    return options
