"""Built-in demo data: synthetic customer messages to a bank, labelled by intent.

The demo federation and the tests need data that (a) needs no download, (b) contains nothing real, so it can
be shipped and shown freely, and (c) is learnable by a small sentence encoder but not trivially so, so that
federated training visibly improves accuracy. Every message is generated here from templates and slot
fillers with a seeded numpy Generator, so a seed reproduces the exact same files.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .partition import dirichlet_partition

__all__ = [
    "BANK_INTENTS",
    "generate_bank_instructions",
    "generate_bank_messages",
    "write_demo_sites",
]

BANK_INTENTS: tuple[str, ...] = (
    "card_lost",
    "balance",
    "transfer",
    "loan",
    "mortgage",
    "fraud",
    "address_change",
    "account_close",
    "exchange_rate",
    "atm_withdrawal",
)

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "card_lost": (
        "I lost my {card} {time}",
        "I can't find my {card} anywhere, can you block it",
        "my {card} was stolen {place_in}",
        "I think I left my {card} {place_in} {time}",
        "please freeze my {card}, it's missing",
        "my wallet with my {card} got stolen {time}",
        "how do I order a replacement for a lost {card}",
        "I misplaced my {card} and need a new one sent to me",
        "someone took my bag {place_in}, my {card} was in it",
        "can you cancel my {card}? I lost it {time}",
    ),
    "balance": (
        "what is the balance on my {account}",
        "how much money do I have in my {account}",
        "can you tell me my current balance",
        "show me how much is left on my {account}",
        "I want to check my {account} balance",
        "what's my available balance right now",
        "how much can I still spend this month on my {account}",
        "is there more than {amount} {currency} in my {account}",
        "please send me the balance of my {account}",
        "do I have enough funds in my {account} to pay rent",
    ),
    "transfer": (
        "I want to send {amount} {currency} to {person}",
        "how do I transfer money from my {account} to {person}",
        "please move {amount} {currency} from my {account} to my other account",
        "can I wire {amount} {currency} to an account in {city}",
        "I need to make a bank transfer of {amount} {currency} {time_future}",
        "set up a payment of {amount} {currency} to {person}",
        "my transfer to {person} {time} has not arrived yet",
        "how long does a transfer to {city} take",
        "send {amount} {currency} to {person} please",
        "what is the limit for transferring money online",
    ),
    "loan": (
        "I would like to apply for a personal loan of {amount} {currency}",
        "can I borrow {amount} {currency} to buy a car",
        "what interest rate do you charge on a personal loan",
        "am I eligible for a loan of {amount} {currency} over {years} years",
        "how do I apply for a small loan",
        "I need a loan to pay for my studies",
        "what are the monthly repayments on a {amount} {currency} loan",
        "can I pay off my personal loan early",
        "is it possible to get a credit of {amount} {currency} for renovations",
        "how quickly can a loan be approved",
    ),
    "mortgage": (
        "I want to get a mortgage for a house in {city}",
        "what is your current mortgage rate for {years} years",
        "can I remortgage my flat in {city}",
        "how much can I borrow for a home worth {amount} {currency}",
        "we are buying our first home, what mortgage options do you have",
        "I'd like to talk to someone about a fixed rate mortgage",
        "how big a deposit do I need for a mortgage",
        "my mortgage fixed term ends soon, what are my options",
        "can I overpay my mortgage by {amount} {currency} a month",
        "is a {years} year mortgage possible on a property in {city}",
    ),
    "fraud": (
        "there is a payment of {amount} {currency} on my {card} that I did not make",
        "I see a charge from {city} that I don't recognise",
        "someone used my {card} without my permission {time}",
        "I think my account has been hacked",
        "I got a suspicious text asking for my PIN, is it really you",
        "there are transactions on my {account} I never authorised",
        "I was scammed by someone pretending to be from the bank",
        "a strange withdrawal of {amount} {currency} appeared {time}",
        "I want to report a fraudulent payment on my {card}",
        "who made this unknown purchase of {amount} {currency} in {city}",
    ),
    "address_change": (
        "I moved to {city}, how do I update my address",
        "please change my home address to {street}",
        "I need to update my postal address",
        "my new address is {street}, {city}",
        "how can I change the address on my account",
        "we relocated to {city} {time}, can you update my details",
        "where do I change my contact address in the app",
        "please send my letters to {street} from now on",
        "I want to update my residential address after moving",
        "can I change my billing address online",
    ),
    "account_close": (
        "I want to close my {account}",
        "how do I shut down my {account}",
        "please cancel my account with your bank",
        "I'd like to close my {account} and move the money to {city}",
        "what do I need to do to terminate my account",
        "can you close the {account} I opened in {city}",
        "I am leaving the bank, please close all my accounts",
        "I no longer need my {account}, please close it",
        "is there a fee to close my {account}",
        "how long does it take to close an account",
    ),
    "exchange_rate": (
        "what is the exchange rate from {currency} to {currency2}",
        "how many {currency2} will I get for {amount} {currency}",
        "what rate do you give for converting {currency} to {currency2}",
        "can you tell me today's {currency} to {currency2} rate",
        "how much is {amount} {currency} in {currency2}",
        "I'm travelling to {city}, what's the rate for {currency2}",
        "do you charge a fee for currency conversion",
        "what is the current conversion rate for {currency2}",
        "is the {currency} exchange rate better today than {time}",
        "I need to exchange {amount} {currency} into {currency2}",
    ),
    "atm_withdrawal": (
        "the ATM {place_in} kept my {card}",
        "I tried to withdraw {amount} {currency} but the cash machine gave me nothing",
        "the ATM charged me but did not give me the cash",
        "what is my daily cash withdrawal limit",
        "can I withdraw cash at an ATM in {city} with my {card}",
        "why was I charged a fee for taking out cash {time}",
        "the cash machine only gave me part of the {amount} {currency} I asked for",
        "where is the nearest ATM in {city}",
        "my withdrawal at the ATM was declined {time}",
        "how much cash can I take out from the machine per day",
    ),
}

_RESPONSES: dict[str, tuple[str, ...]] = {
    "card_lost": (
        "I'm sorry to hear that. I have blocked your card and a replacement is on its way.",
        "Your card is now frozen so nobody can use it. You can order a new card in the app under Cards.",
    ),
    "balance": (
        "You can see your current balance on the home screen of the app or at any of our ATMs.",
        "Your available balance is shown under Accounts; pending payments are listed below it.",
    ),
    "transfer": (
        "You can send money under Payments > New transfer; transfers within the country arrive the same day.",
        "International transfers usually take 1 to 3 working days. You can track them under Payments.",
    ),
    "loan": (
        "You can apply for a personal loan in the app under Borrow; we usually decide within a day.",
        "Our personal loan rate depends on the amount and term. The loan calculator shows repayments.",
    ),
    "mortgage": (
        "One of our mortgage advisers can help. You can book an appointment in the app under Mortgages.",
        "Our current fixed and variable mortgage rates are listed under Mortgages, with a calculator.",
    ),
    "fraud": (
        "Please don't worry: I have blocked your card and opened a fraud case. We will contact you shortly.",
        "We never ask for your PIN. I have flagged the transaction and our fraud team will review it today.",
    ),
    "address_change": (
        "You can update your address in the app under Profile > Personal details.",
        "Please send us proof of your new address and we will update your details within two working days.",
    ),
    "account_close": (
        "I'm sorry to see you go. You can close the account under Settings once its balance is zero.",
        "To close your account, move the remaining money out and confirm the closure in the app.",
    ),
    "exchange_rate": (
        "Our live exchange rates are shown under Payments > Currencies; a small margin applies.",
        "The rate is fixed at the moment you confirm the conversion. You can check it in the app first.",
    ),
    "atm_withdrawal": (
        "If the ATM did not give you the cash, it is refunded automatically within 5 days.",
        "Your daily cash limit is shown under Cards > Limits and can be changed there.",
    ),
}

_SLOTS: dict[str, tuple[str, ...]] = {
    "card": ("card", "debit card", "credit card", "Visa card", "Mastercard", "bank card", "contactless card"),
    "account": ("account", "checking account", "savings account", "current account", "joint account"),
    "currency": ("EUR", "USD", "GBP", "CHF", "euros", "dollars", "pounds", "francs"),
    "currency2": ("yen", "USD", "euros", "Swiss francs", "pounds", "dollars", "Canadian dollars", "SEK"),
    "city": (
        "Berlin",
        "Paris",
        "London",
        "Madrid",
        "Zurich",
        "Vienna",
        "Rome",
        "Lisbon",
        "Oslo",
        "Dublin",
        "Prague",
        "Warsaw",
        "Amsterdam",
        "Brussels",
        "Munich",
        "Lyon",
        "Milan",
        "Geneva",
    ),
    "place_in": (
        "at the supermarket",
        "on the train",
        "at the airport",
        "in a taxi",
        "at the gym",
        "at a restaurant",
        "in the city centre",
        "at the station",
        "on the bus",
        "at the petrol station",
    ),
    "time": (
        "yesterday",
        "this morning",
        "last night",
        "on Monday",
        "two days ago",
        "last week",
        "an hour ago",
        "on Friday evening",
        "earlier today",
        "at the weekend",
    ),
    "time_future": ("today", "tomorrow", "next Monday", "at the end of the month", "on Friday", "right now"),
    "person": (
        "my landlord",
        "my sister",
        "my brother",
        "a friend",
        "my mother",
        "my son",
        "my daughter",
        "a colleague",
        "my plumber",
        "my partner",
    ),
    "years": ("5", "10", "15", "20", "25", "30"),
    "street": (
        "12 High Street",
        "4 Station Road",
        "27 Park Lane",
        "8 Church Street",
        "150 Main Street",
        "3 Mill Lane",
        "61 Queen's Road",
        "19 Victoria Avenue",
    ),
}

_PREFIXES: tuple[str, ...] = (
    "", "", "", "", "Hi, ", "Hello, ", "Good morning, ", "Hey, ", "Excuse me, ", "Hi there, ", "Dear bank, ",
    "Quick question: ", "Sorry to bother you, ", "Urgent: ",
)  # fmt: skip
_SUFFIXES: tuple[str, ...] = (
    "", "", "", "", "?", ".", " please.", ", thanks!", ". Thank you.", " asap", " - thanks in advance.", "!!",
)  # fmt: skip

_TYPO_PROBABILITY = 0.15


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _amount(rng: np.random.Generator) -> str:
    """Amounts in the formats customers actually type: round, with thousands separators, with cents."""
    style = int(rng.integers(4))
    if style == 0:
        return str(int(rng.integers(1, 100)) * 10)
    if style == 1:
        return f"{int(rng.integers(1, 50)) * 100:,}"
    if style == 2:
        return f"{rng.integers(1, 1000) + rng.integers(0, 100) / 100:.2f}"
    return str(int(rng.integers(1, 200)) * 1000)


def _fill(template: str, rng: np.random.Generator) -> str:
    values: dict[str, str] = {"amount": _amount(rng)}
    for slot, options in _SLOTS.items():
        if "{" + slot + "}" in template:
            values[slot] = _pick(rng, options)
    if values.get("currency2") == values.get("currency"):
        values["currency2"] = "yen"
    return template.format(**values)


def _typo(text: str, rng: np.random.Generator) -> str:
    """Swap two letters or drop one in a random longer word: real messages are not proofread."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = candidates[int(rng.integers(len(candidates)))]
    word = words[i]
    k = int(rng.integers(1, len(word) - 2))
    if rng.random() < 0.5:
        words[i] = word[:k] + word[k + 1] + word[k] + word[k + 2 :]
    else:
        words[i] = word[:k] + word[k + 1 :]
    return " ".join(words)


def _message(intent: str, rng: np.random.Generator) -> str:
    # Templates start in lower case (except "I"), so a greeting prefix can be glued on directly.
    body = _fill(_pick(rng, _TEMPLATES[intent]), rng)
    prefix = _pick(rng, _PREFIXES)
    text = prefix + body if prefix else body[0].upper() + body[1:]
    text += _pick(rng, _SUFFIXES)
    if rng.random() < 0.1:
        text = text.lower()
    if rng.random() < _TYPO_PROBABILITY:
        text = _typo(text, rng)
    return text


def _balanced_labels(n: int, rng: np.random.Generator) -> list[int]:
    """Each intent n // K or n // K + 1 times, in random order, so no class dominates the demo."""
    k = len(BANK_INTENTS)
    labels = np.arange(n) % k
    # Which intents get the extra rows when n is not a multiple of K is itself random, not always the first.
    labels = rng.permutation(k)[labels]
    return [int(x) for x in rng.permutation(labels)]


def generate_bank_messages(n: int, seed: int) -> tuple[list[str], list[int]]:
    """n synthetic customer messages and their intent indices into BANK_INTENTS, balanced across intents."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(n, rng)
    texts = [_message(BANK_INTENTS[label], rng) for label in labels]
    return texts, labels


def generate_bank_instructions(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Prompt/response pairs for the causal-LM path: a customer message and a short answer for its intent."""
    texts, labels = generate_bank_messages(n, seed)
    # A separate stream, so responses do not shift the messages a given seed produces.
    rng = np.random.default_rng([seed, 1])
    responses = [_pick(rng, _RESPONSES[BANK_INTENTS[label]]) for label in labels]
    return texts, responses


def write_demo_sites(out_dir: Path, num_sites: int, rows_per_site: int, alpha: float, seed: int) -> list[Path]:
    """Write site-1.csv ... site-N.csv (columns text,label) with Dirichlet(alpha)-skewed intent mixes.

    Sites receive rows_per_site rows on average; sizes vary with the skew, as they would between real banks.
    """
    if num_sites < 1 or rows_per_site < 1:
        raise ValueError("num_sites and rows_per_site must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts, labels = generate_bank_messages(num_sites * rows_per_site, seed)
    parts = dirichlet_partition(labels, num_sites, alpha, seed, min_size=min(10, rows_per_site))
    paths: list[Path] = []
    for site, indices in enumerate(parts, start=1):
        path = out_dir / f"site-{site}.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows([texts[i], BANK_INTENTS[labels[i]]] for i in indices)
        paths.append(path)
    return paths
