"""The memory-quality evaluation's data (issue 14), used by tests/test_memory_quality.py.

- `PEOPLE`: simulated people. Each has `targets` - a fact as the app stores it (third person,
  "The user ...") with the query that person would later ask or say about it - and
  `distractors`, other true facts about the same person that no query is about. A query
  paraphrases its fact without sharing a key word (`content_words`: lower-cased, punctuation
  removed, `STOP_WORDS` and "user" dropped, a trivial plural "s" stripped; no two words may
  even share their first five letters, so "allergy" cannot answer "allergic"), so only an
  embedder that understands meaning finds it. Distractors are on the same topics as the
  targets (another relative, another place, another date) so that a topic alone is not enough.
- `DUPLICATES`: pairs of facts that say the same thing in other words, as the extraction
  model might write one fact twice; the second should be skipped as a near-duplicate.
- `NEAR_MISSES`: pairs of the same shape that say different things (another city, likes
  against dislikes, another relative, another date, a past tense, a negation); the second is
  a new fact and must be stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# English function words only: a content word (noun, verb, adjective, name, number) is
# never here, or the rule against shared key words would be weaker than it says.
_FUNCTION_WORDS = """
    a about after again all am an and any are as at be because been before being between both
    but by can cannot could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just
    me more most much my myself no nor not now of off on once only or other our ours ourselves
    out over own same she should so some such than that the their theirs them themselves then
    there these they this those through to too under until up very was we were what when where
    which while who whom whose why will with would you your yours yourself
"""
STOP_WORDS = frozenset(_FUNCTION_WORDS.split())
# "user" is how every stored fact names the person; it is not a key word.
NOT_CONTENT = STOP_WORDS | {"user"}
# Words sharing this many first letters count as one key word ("allergic", "allergy").
SHARED_PREFIX = 5

_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> set[str]:
    """The key words of `text`, as the no-shared-words rule compares them."""
    # The apostrophe goes before splitting: "user's" is "users", then "user".
    words = _WORD.findall(text.lower().replace("'", "").replace("\u2019", ""))
    return {stem for word in words if word not in NOT_CONTENT and (stem := _singular(word)) not in NOT_CONTENT}


def _singular(word: str) -> str:
    """A trivial plural's "s" off: "dogs" is "dog" ("users" is "user", "what's" "what")."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def shared_key_words(query: str, fact: str) -> set[str]:
    """The query's key words that the fact shares, equal or with the same first letters."""
    facts = content_words(fact)
    return {
        word
        for word in content_words(query)
        for other in facts
        if word == other or (len(word) >= SHARED_PREFIX and word[:SHARED_PREFIX] == other[:SHARED_PREFIX])
    }


@dataclass(frozen=True)
class Target:
    fact: str
    query: str


@dataclass(frozen=True)
class Person:
    key: str  # also the session id's suffix: URL-safe
    targets: tuple[Target, ...]
    distractors: tuple[str, ...]

    @property
    def facts(self) -> tuple[str, ...]:
        return tuple(target.fact for target in self.targets) + self.distractors


PEOPLE: tuple[Person, ...] = (
    Person(
        "amara",  # a nurse in London, married, grew up in Lagos
        (
            Target("The user's dog is called Max.", "What is my pet's name?"),
            Target("The user is allergic to peanuts.", "Is there any food that gives me a bad reaction?"),
            Target("The user works as a nurse at St Thomas' Hospital.", "What is my job?"),
            Target("The user's sister Leila lives in Toronto.", "Where has my sibling settled?"),
            Target("The user's birthday is on 14 March.", "When do I turn a year older?"),
            Target("The user plays the cello in an amateur orchestra.", "What instrument do I perform on?"),
            Target("The user is vegetarian.", "Do I eat meat?"),
            Target("The user grew up in Lagos.", "Which city was I raised in as a kid?"),
            Target("The user's favourite colour is green.", "Which shade do I like best?"),
            Target("The user takes insulin for type 1 diabetes.", "What medical condition do I manage every day?"),
            Target("The user's husband is called Tunde.", "What's my spouse's name?"),
            Target("The user is afraid of flying.", "What phobia do I have about planes?"),
        ),
        (
            "The user's brother Femi is a software engineer.",
            "The user drives a blue Toyota Corolla.",
            "The user's mother makes jollof rice every Sunday.",
            "The user goes running along the Thames on weekends.",
            "The user prefers tea to coffee.",
            "The user's neighbour keeps a parrot.",
            "The user is learning Portuguese.",
            "The user lives in a flat in Brixton.",
            "The user's wedding anniversary is in June.",
        ),
    ),
    Person(
        "bruno",  # a developer in Lisbon, two daughters, a cyclist
        (
            Target("The user has two daughters, Sofia and Lucia.", "How many kids do I have?"),
            Target("The user is lactose intolerant.", "Can I drink milk?"),
            Target("The user is a backend developer at a bank.", "What do I do for a living?"),
            Target("The user's cat is named Pixel.", "What did I call my kitten?"),
            Target("The user rides a road bike about 100 km every weekend.", "How far do I cycle on Saturdays?"),
            Target("The user was born in Coimbra.", "What is my hometown?"),
            Target("The user's favourite food is grilled sardines.", "Which dish do I enjoy most?"),
            Target("The user gets hay fever from pollen in spring.", "Why do I sneeze so much in April?"),
            Target("The user's father is a retired fisherman.", "What was my dad's occupation?"),
            Target("The user supports FC Porto.", "Which football club am I a fan of?"),
            Target("The user dislikes horror films.", "What kind of movie do I avoid?"),
            Target("The user's wife Ana teaches chemistry.", "What subject does my partner give lessons in?"),
        ),
        (
            "The user lives in Lisbon near the river.",
            "The user drinks two espressos every morning.",
            "The user's brother lives in Paris.",
            "The user plays chess online in the evenings.",
            "The user had knee surgery in 2019.",
            "The user speaks Portuguese, English and German.",
            "The user is saving money to buy a house.",
            "The user's daughters go to a bilingual school.",
            "The user enjoys cooking seafood risotto.",
        ),
    ),
    Person(
        "chen",  # a retired teacher in Vancouver, widowed, two grown children
        (
            Target("The user's son has twin boys.", "Do I have any grandchildren?"),
            Target("The user is allergic to penicillin.", "Which antibiotic must doctors never give me?"),
            Target("The user retired from teaching mathematics in 2020.", "What did I do before I stopped working?"),
            Target("The user lives in Vancouver.", "Which city is my home?"),
            Target("The user grows tomatoes and roses in her garden.", "What do I plant in my backyard?"),
            Target("The user's husband passed away in 2018.", "Is my spouse still alive?"),
            Target("The user has high blood pressure.", "Do I have hypertension?"),
            Target("The user enjoys doing jigsaw puzzles.", "What do I like to piece together in my spare time?"),
            Target("The user's favourite drink is green tea.", "What beverage do I prefer?"),
            Target("The user takes the bus because she does not drive.", "How do I get around town?"),
            Target("The user's daughter Mei is a dentist.", "What is my girl's profession?"),
            Target("The user's birthday is 2 November.", "What date was I born?"),
        ),
        (
            "The user volunteers at the public library on Tuesdays.",
            "The user walks for half an hour every morning.",
            "The user's son Wei works in Seattle.",
            "The user was born in Guangzhou.",
            "The user watches Korean dramas in the evening.",
            "The user's neighbour helps her with the shopping.",
            "The user had cataract surgery last spring.",
            "The user likes dim sum on Sundays.",
            "The user speaks Cantonese and English.",
        ),
    ),
    Person(
        "diego",  # an architecture student in Mexico City
        (
            Target("The user studies architecture at UNAM.", "What is my degree subject?"),
            Target("The user's girlfriend is called Valeria.", "What's my partner's name?"),
            Target("The user is allergic to bee stings.", "What insect could send me to hospital?"),
            Target("The user goes rock climbing twice a week.", "Which sport do I practise regularly?"),
            Target("The user shares an apartment with two roommates.", "Do I live alone?"),
            Target("The user's grandmother taught him to make mole.", "Who showed me how to cook my favourite sauce?"),
            Target("The user wants to visit Japan next year.", "Where am I hoping to travel soon?"),
            Target("The user has asthma and carries an inhaler.", "Do I have any breathing problems?"),
            Target("The user's birthday is 30 July.", "When was I born?"),
            Target("The user's dog Luna is a golden retriever.", "What breed is my puppy?"),
            Target("The user cannot stand coriander.", "Which herb do I hate?"),
            Target("The user works weekends as a barista.", "What is my side job?"),
        ),
        (
            "The user's brother Pablo lives in Guadalajara.",
            "The user listens to jazz while studying.",
            "The user drinks coffee without sugar.",
            "The user's mother is a lawyer.",
            "The user broke his wrist skateboarding at fifteen.",
            "The user is learning to play the guitar.",
            "The user's favourite film is Spirited Away.",
            "The user cycles to campus.",
            "The user supports the football club Pumas.",
        ),
    ),
    Person(
        "elif",  # a project manager in Manchester, expecting her first child
        (
            Target("The user is expecting a baby in October.", "When am I due to give birth?"),
            Target("The user is a project manager at an engineering firm.", "What is my role at the company?"),
            Target("The user is allergic to cats.", "Which animal makes me sneeze and itch?"),
            Target("The user's parents live in Izmir.", "Where are my mum and dad based?"),
            Target("The user swims at the local pool three mornings a week.", "What exercise do I do regularly?"),
            Target("The user's husband Can is a pilot.", "What does my spouse do for a living?"),
            Target("The user is a big fan of Galatasaray.", "Which team do I cheer for?"),
            Target("The user lives in Manchester.", "What town do I reside in?"),
            Target("The user hates spicy food.", "Do I like chilli and hot dishes?"),
            Target("The user is reading a book a week this year.", "How many novels do I get through?"),
            Target("The user's best friend is called Zeynep.", "Who is my closest mate?"),
            Target("The user takes iron supplements for anaemia.", "What pills am I on for my blood?"),
        ),
        (
            "The user's brother Emre lives in Ankara.",
            "The user drinks Turkish tea every afternoon.",
            "The user commutes by tram.",
            "The user is learning to knit baby clothes.",
            "The user had her appendix removed as a child.",
            "The user's favourite holiday destination is Crete.",
            "The user speaks Turkish at home.",
            "The user's office is in Salford.",
            "The user's dog Bella is ten years old.",
        ),
    ),
    Person(
        "freya",  # a piano teacher in Edinburgh, vegan, a runner
        (
            Target("The user teaches piano to children.", "How do I earn my income?"),
            Target("The user is vegan.", "Do I eat animal products?"),
            Target("The user owns a horse called Thistle.", "What is my pony's name?"),
            Target("The user lives in Edinburgh.", "Which Scottish city do I call home?"),
            Target("The user suffers from migraines.", "What kind of headaches do I get?"),
            Target("The user's partner Rory is a firefighter.", "What is my boyfriend's job?"),
            Target("The user hikes in the Highlands most weekends.", "Where do I go walking on Saturdays?"),
            Target("The user's mother is Norwegian.", "Where is my mum from originally?"),
            Target("The user's favourite season is autumn.", "Which time of year do I love most?"),
            Target("The user is allergic to shellfish.", "Which seafood makes me ill?"),
            Target("The user got married on 12 August 2017.", "When is my wedding anniversary?"),
            Target("The user is training for a marathon.", "What race am I preparing for?"),
        ),
        (
            "The user's brother Magnus lives in Oslo.",
            "The user drinks oat milk in her coffee.",
            "The user has a tattoo of a fern.",
            "The user sings in a folk choir.",
            "The user's flat overlooks Arthur's Seat.",
            "The user bakes sourdough bread.",
            "The user's partner's parents live in Glasgow.",
            "The user cycles to her students' homes.",
            "The user is saving for a trip to Iceland.",
        ),
    ),
)

# (stored first, written again later): the same fact re-worded.
DUPLICATES: tuple[tuple[str, str], ...] = (
    ("The user's sister lives in Paris.", "The user has a sister who lives in Paris."),
    ("The user's dog is called Max.", "The user has a dog named Max."),
    ("The user is allergic to peanuts.", "The user has a peanut allergy."),
    ("The user works as a nurse.", "The user is a nurse."),
    ("The user likes tea.", "The user enjoys drinking tea."),
    ("The user was born in 1985.", "The user's birth year is 1985."),
    ("The user lives in Berlin.", "The user is based in Berlin."),
    ("The user is vegetarian.", "The user does not eat meat."),
    ("The user has two children.", "The user has two kids."),
    ("The user's favourite colour is blue.", "The user's favorite color is blue."),
    ("The user plays the guitar.", "The user plays guitar."),
    ("The user's husband is called David.", "The user is married to David."),
    ("The user drives a red Honda.", "The user's car is a red Honda."),
    ("The user goes running every morning.", "The user runs every morning."),
    ("The user speaks French fluently.", "The user is fluent in French."),
    ("The user's birthday is on 14 March.", "The user was born on 14 March."),
    ("The user hates mushrooms.", "The user really dislikes mushrooms."),
    ("The user moved to Canada in 2015.", "The user has lived in Canada since 2015."),
    ("The user is training for a marathon.", "The user is preparing to run a marathon."),
    ("The user has a cat named Pixel.", "The user's cat is called Pixel."),
    ("The user studies law at university.", "The user is a law student."),
    ("The user's mother is a teacher.", "The user's mum works as a teacher."),
    ("The user is afraid of spiders.", "The user has a fear of spiders."),
    ("The user takes insulin for diabetes.", "The user is diabetic and uses insulin."),
)

# (stored first, then a different fact of the same shape): both must be kept.
NEAR_MISSES: tuple[tuple[str, str], ...] = (
    ("The user's sister lives in Paris.", "The user's sister lives in Rome."),
    ("The user likes tea.", "The user dislikes tea."),
    ("The user's sister lives in Paris.", "The user's brother lives in Paris."),
    ("The user's dog is called Max.", "The user's dog is called Rex."),
    ("The user's dog is called Max.", "The user's cat is called Max."),
    ("The user is allergic to peanuts.", "The user is allergic to shellfish."),
    ("The user works as a nurse.", "The user works as a doctor."),
    ("The user was born in 1985.", "The user was born in 1958."),
    ("The user has two children.", "The user has three children."),
    ("The user's favourite colour is blue.", "The user's favourite colour is green."),
    ("The user plays the guitar.", "The user plays the piano."),
    ("The user's husband is called David.", "The user's son is called David."),
    ("The user drives a red Honda.", "The user drives a blue Honda."),
    ("The user goes running every morning.", "The user goes running every evening."),
    ("The user speaks French fluently.", "The user speaks Spanish fluently."),
    ("The user's birthday is on 14 March.", "The user's birthday is on 14 May."),
    ("The user hates mushrooms.", "The user loves mushrooms."),
    ("The user moved to Canada in 2015.", "The user moved to Australia in 2015."),
    ("The user is training for a marathon.", "The user is training for a triathlon."),
    ("The user's mother is a teacher.", "The user's father is a teacher."),
    ("The user is vegetarian.", "The user is vegan."),
    ("The user lives in Berlin.", "The user used to live in Berlin."),
    ("The user drinks coffee every morning.", "The user stopped drinking coffee."),
    ("The user's wedding anniversary is in June.", "The user's birthday is in June."),
    # A corrected date or a changed tense is a new fact too, and the closest to its old one.
    ("The user's birthday is on 14 March.", "The user's birthday is on 15 March."),
    ("The user was born in 1985.", "The user was born in 1986."),
    ("The user's flight is on Monday.", "The user's flight is on Tuesday."),
    ("The user's sister lives in Paris.", "The user's sister used to live in Paris."),
    ("The user's dog is called Max.", "The user's dog was called Max."),
    ("The user works at Google.", "The user worked at Google."),
    ("The user's son is 7 years old.", "The user's son is 8 years old."),
    # A negation is a new fact, and one that matters.
    ("The user is allergic to peanuts.", "The user is not allergic to peanuts."),
    ("The user is married.", "The user is not married."),
)
