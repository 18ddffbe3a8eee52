"""Write data/sample/booksummaries.txt: a SYNTHETIC corpus in the CMU Book Summary format.

The real corpus cannot be fetched on the machines bookgen is developed on, so the embedded default
trains on readable summaries assembled from templates. Rows follow the real layout exactly: seven
tab-separated columns (Wikipedia id, Freebase id, title, author, date, genres JSON, summary), with
some dates and genres empty as in the original. Run: python data/make_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROWS = 400
SEED = 1234

FIRST = ["Anna", "Tomas", "Mira", "Elias", "Clara", "Jonah", "Lena", "Oskar", "Iris", "Felix", "Nora", "Hugo"]
LAST = ["Marlow", "Vance", "Okafor", "Lindqvist", "Serrano", "Achebe", "Holt", "Mercer", "Duarte", "Kowalski"]
PLACES = ["a fishing village in the north", "the city of Varen", "a mining town", "an old manor house",
          "a colony on a distant moon", "a kingdom at war", "post-war London", "a desert monastery",
          "a floating market", "a snowbound research station"]
GOALS = ["find her missing brother", "uncover the truth about his father", "win back the family farm",
         "stop a conspiracy inside the council", "escape a life of debt", "deliver a secret letter",
         "prove his innocence", "rebuild the ruined library", "break an ancient curse"]
OBSTACLES = ["a ruthless magistrate", "a storm that cuts the roads", "the distrust of the villagers",
             "a rival who knows every secret", "an illness that spreads through the town",
             "a betrayal by a close friend", "the loss of the only map", "a war that reaches the border"]
TURNS = ["learns that the enemy is a relative", "discovers a hidden diary", "is captured and imprisoned",
         "forms an unlikely alliance", "loses everything in a fire", "realises the prophecy was a lie",
         "is forced to choose between love and duty", "finds the key in an old song"]
ENDINGS = ["returns home changed and wiser", "sacrifices the prize to save a friend",
           "exposes the conspiracy before the whole council", "leaves the town forever",
           "finally understands the father who left", "rebuilds what was lost with new friends"]
GENRES = {"/m/02xlf": "Fiction", "/m/06n90": "Science Fiction", "/m/01hmnh": "Fantasy",
          "/m/02n4kr": "Mystery", "/m/05hgj": "Novel", "/m/014dfn": "Speculative fiction",
          "/m/0dwly": "Children's literature", "/m/098tmk": "War novel"}
TITLE_A = ["The Silent", "A House of", "The Last", "Under the", "The Winter", "Children of", "The Glass"]
TITLE_B = ["Harbour", "Ashes", "Lantern", "Orchard", "Crown", "River", "Machine", "Garden", "Tide"]


def summary(rng: random.Random) -> str:
    hero, friend, foe = (f"{rng.choice(FIRST)} {rng.choice(LAST)}" for _ in range(3))
    parts = [f"The story is set in {rng.choice(PLACES)}, where {hero} lives with {friend}."]
    parts.append(f"{hero.split()[0]} sets out to {rng.choice(GOALS)}, but faces {rng.choice(OBSTACLES)}.")
    for _ in range(rng.randint(1, 14)):
        sentence = rng.choice([
            f"Along the way {hero.split()[0]} {rng.choice(TURNS)}.",
            f"{friend.split()[0]} warns that {foe} is watching them, and {rng.choice(OBSTACLES)} follows.",
            f"In {rng.choice(PLACES)} they meet {foe}, who {rng.choice(TURNS)}.",
            f"The chapter ends when {hero.split()[0]} {rng.choice(TURNS)}.",
        ])
        parts.append(sentence)
    parts.append(f"In the end {hero.split()[0]} {rng.choice(ENDINGS)}.")
    return " ".join(parts)


def row(i: int, rng: random.Random) -> str:
    genres = dict(rng.sample(sorted(GENRES.items()), rng.randint(1, 3)))
    genre_json = json.dumps(genres) if rng.random() > 0.1 else ""
    date = f"{rng.randint(1850, 2010)}" if rng.random() > 0.2 else ""
    title = f"{rng.choice(TITLE_A)} {rng.choice(TITLE_B)}"
    author = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    # the real corpus starts every summary with a space and has stray newlines inside: keep that shape
    text = " " + summary(rng).replace(". ", ".\u00a0", rng.randint(0, 1))
    return "\t".join([str(1000 + i), f"/m/0syn{i:03d}", title, author, date, genre_json, text])


def main() -> None:
    rng = random.Random(SEED)
    out = Path(__file__).parent / "sample" / "booksummaries.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(row(i, rng) for i in range(ROWS)) + "\n", encoding="utf-8")
    print(f"wrote {ROWS} synthetic rows to {out}")


if __name__ == "__main__":
    main()
