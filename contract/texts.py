"""The bot's conversation texts (gettext domain ``bot``), shared by the bot and the delivery worker.

Every text is a function of the language (and of the numbers it mentions), so handlers stay short
and the catalogs (``contract/locales/<lang>/LC_MESSAGES/bot.po``) have one home. Always call ``_`` /
``ngettext`` on literals here: they are what the catalog test extracts. Result texts (findings,
advice, the physician prompt) are the ``diagnosis`` domain, rendered by ``diagnosis.messages``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from .formats import FORMAT_NAMES
from .i18n import N_, fill, load_catalog, pick_language
from .keys import TELEGRAM_DOWNLOAD_LIMIT_MB

DOMAIN = "bot"
LOCALES_DIR = Path(__file__).parent / "locales"

# Command menu (setMyCommands), translated per language at startup.
COMMANDS = (
    ("start", N_("What this bot does and does not do")),
    ("help", N_("How to send an image")),
    ("language", N_("Choose the language")),
    ("mode", N_("Screening or clinician replies")),
    ("privacy", N_("What is stored and for how long")),
    ("forget", N_("Delete everything the service holds about you")),
)


def translator(language: str | None) -> tuple[Callable[[str], str], Callable[[str, str, int], str]]:
    """(gettext, ngettext) of the ``bot`` domain for a supported language (unknown → English)."""
    catalog = load_catalog(LOCALES_DIR, pick_language(language), DOMAIN)
    return catalog.gettext, catalog.ngettext


# --------------------------------------------------------------------------- access and commands
def not_allowed(language: str, user_id: int | str) -> str:
    _, _n = translator(language)
    return fill(_("Sorry, this bot is available to approved users only. Your Telegram user id is {user_id}; "
                  "ask the operator to add it."), language, user_id=user_id)


def start(language: str, analysable: str = "") -> str:
    """/start: what the bot does and does not do, the disclaimer, privacy in two lines. ``analysable``: the
    sentence naming the body parts the models present read (``diagnosis.messages.analysable_sentence``,
    the same as in the reply to a film of another part; the bot builds it from the model cards)."""
    _, _n = translator(language)
    intro = fill(_(
        "Hello! I give a second opinion on X-ray images.\n\n"
        "Send me a radiograph as a photo or as a file ({formats}, up to {limit_mb} MB). "
        "I check that it is an X-ray and which body part it shows; for the body parts I can analyse, I estimate "
        "the probability of common findings and send a heat map of the regions that drove them."
    ), language, formats=FORMAT_NAMES, limit_mb=TELEGRAM_DOWNLOAD_LIMIT_MB)
    limits = _(
        "What I do not do: I do not make a diagnosis and I do not replace a physician or a radiologist. "
        "Always discuss your images and any result with a physician.\n\n"
        "Privacy: your image is held in memory for at most one hour and deleted once you have the answer; "
        "nothing is written to disk. Details: /privacy. Language: /language. Help: /help.")
    return "\n\n".join(part for part in (intro, analysable, limits, _(MODE_HINT)) if part)


def help_text(language: str, images: int, window_s: int) -> str:
    """/help: how to send a good image, the limits (``images`` per ``window_s``), the commands."""
    _, ngettext = translator(language)
    minutes = max(1, math.ceil(window_s / 60))
    limit_line = fill(ngettext(
        "You can send up to {limit} images per {minutes} minute.",
        "You can send up to {limit} images per {minutes} minutes.",
        minutes,
    ), language, limit=images, minutes=minutes)
    return fill(_(
        "How to use this bot:\n"
        "• Send an X-ray as a photo, or as a file for full quality: {formats}, up to {limit_mb} MB. "
        "Albums work too: every image gets its own answer.\n"
        "• Photographing a film or a screen? Hold the phone parallel to it, fill the frame, avoid glare.\n"
        "• You get the findings with their probabilities and, when there is one, a heat map.\n"
        "• {limit_line}\n\n"
        "Commands:\n"
        "/start – what this bot does and does not do\n"
        "/language – choose the language\n"
        "/privacy – what is stored and for how long\n"
        "/forget – delete everything the service holds about you\n"
        "/help – this message"
    ), language, limit_line=limit_line, formats=FORMAT_NAMES, limit_mb=TELEGRAM_DOWNLOAD_LIMIT_MB) + "\n" + _(
        "/mode – screening replies (default) or clinician replies with every finding")


def privacy(language: str) -> str:
    """/privacy: what is stored, for how long, and that Telegram chats are cloud chats."""
    _, _n = translator(language)
    return _(
        "Privacy\n\n"
        "What this service stores, and for how long:\n"
        "• Your image and its heat map: in memory (Redis), never on disk, for at most one hour; "
        "deleted as soon as you have the answer.\n"
        "• Your language choice: until you use /forget, or a year without use.\n"
        "• For the rate limit: the times at which you sent your recent images, until they leave the limit window.\n"
        "• Images and results are not written to logs and are not used for training.\n\n"
        "Telegram chats are cloud chats: Telegram keeps the images and answers of this chat on its servers "
        "until you delete them.\n\n"
        "/forget deletes everything this service holds about you. To remove the chat history kept by "
        "Telegram, delete the chat."
    )


def forgotten(language: str) -> str:
    _, _n = translator(language)
    return _(
        "Done: everything this service held about you (language choice, rate-limit data, images still being "
        "processed) has been deleted. Telegram keeps this chat's history until you delete the chat."
    )


def choose_language(language: str) -> str:
    _, _n = translator(language)
    return _("Choose your language:")


def language_set(language: str) -> str:
    """Confirmation, said in the newly chosen language."""
    _, _n = translator(language)
    return _("Done: I will answer in English.")


# --------------------------------------------------------------------------- reply mode
MODE_HINT = N_("Replies come in screening mode: a verdict first and only the findings the model checks "
               "reliably. /mode switches to clinician mode, with every finding and its error rates.")
MODE_MEANING = N_(
    "Screening (default): a verdict first, in plain words, with how often the check is wrong; only the findings "
    "this model checks reliably are pointed out, at points chosen so that few normal films raise an alarm.\n"
    "Clinician: every finding with its calibrated probability, its operating point and the sensitivity, "
    "specificity and AUC behind it.\n"
    "Switch with /mode, or choose with /mode screening or /mode clinician. The choice is kept for {days} days.")


def mode_set(language: str, mode: str, days: int = 30) -> str:
    """/mode: the mode now in force, then what each mode means."""
    _, _n = translator(language)
    now = _("Replies in this chat are now in clinician mode.") if mode == "clinician" else \
        _("Replies in this chat are now in screening mode.")
    return now + "\n\n" + fill(_(MODE_MEANING), language, days=days)


def mode_unknown(language: str) -> str:
    _, _n = translator(language)
    return _("Unknown mode. Use /mode screening or /mode clinician (or /mode alone to switch).")


# --------------------------------------------------------------------------- images
def not_an_image_file(language: str) -> str:
    _, _n = translator(language)
    return fill(_("I cannot analyse this type of file. Please send an image file ({formats}), "
                  "or send the X-ray as a photo."), language, formats=FORMAT_NAMES)


def too_large(language: str, limit_mb: int = TELEGRAM_DOWNLOAD_LIMIT_MB) -> str:
    """The one "too large" refusal, wherever it is made: the bot before downloading, the intake's refusal
    in a reply (``diagnosis.messages.rejection_text``), the HTTP API (with its own limit)."""
    _, _n = translator(language)
    return fill(_("The file is larger than {limit_mb} MB. Please send a smaller image or a photo of the film."),
                language, limit_mb=limit_mb)


def rate_limited(language: str, wait_s: float, accepted: int | None = None, refused: int | None = None) -> str:
    """When to try again and, when known, how many images of the window were accepted and how many
    of this burst were not."""
    _, ngettext = translator(language)
    minutes = max(1, math.ceil(wait_s / 60))
    text = fill(ngettext(
        "You have sent many images in a short time. Please try again in {minutes} minute.",
        "You have sent many images in a short time. Please try again in {minutes} minutes.",
        minutes,
    ), language, minutes=minutes)
    if accepted is not None:
        text += "\n" + fill(ngettext("{count} image was accepted for analysis.",
                                     "{count} images were accepted for analysis.", accepted), language, count=accepted)
    if refused:
        text += "\n" + fill(ngettext("{count} image was not accepted; please send it again then.",
                                     "{count} images were not accepted; please send them again then.",
                                     refused), language, count=refused)
    return text


def received(language: str, waiting: int, count: int = 1) -> str:
    """The acknowledgement, with the queue position when others are waiting; ``count`` > 1: one
    message acknowledging that many images of a burst (``contract.bursts``)."""
    _, ngettext = translator(language)
    if count > 1:
        text = fill(ngettext("Received {count} image, analysing…", "Received {count} images, analysing…", count),
                    language, count=count)
    else:
        text = _("Received, analysing…")
    if waiting > 0:
        text += "\n" + fill(ngettext(
            "{count} image is ahead of yours in the queue.",
            "{count} images are ahead of yours in the queue.",
            waiting,
        ), language, count=waiting)
    return text


def download_failed(language: str) -> str:
    _, _n = translator(language)
    return _("I could not download this file from Telegram. Please send it again.")


def service_unavailable(language: str) -> str:
    _, _n = translator(language)
    return _("Sorry, the analysis service is unavailable right now. Please try again in a few minutes.")


def other_message(language: str) -> str:
    """Text, stickers, video, voice, unknown commands: what to send instead."""
    _, _n = translator(language)
    return fill(_("I analyse X-ray images only. Please send a radiograph as a photo, or as a file "
                  "({formats}, up to {limit_mb} MB). More: /help"), language,
                formats=FORMAT_NAMES, limit_mb=TELEGRAM_DOWNLOAD_LIMIT_MB)


def internal_error(language: str) -> str:
    _, _n = translator(language)
    return _("Sorry, something went wrong on our side. Please try again.")


# --------------------------------------------------------------------------- answers (workers, watchdog)
def lost(language: str) -> str:
    """The bot's watchdog: an accepted request whose task and image are gone."""
    _, _n = translator(language)
    return _("Sorry, your image was lost because of a problem on our side and was not analysed. "
             "Please send it again.")


def expired(language: str) -> str:
    """The delivery worker: the image expired or was deleted with /forget before the analysis."""
    _, _n = translator(language)
    return _("Your image is no longer available (it expired or was deleted with /forget). "
             "Please send it again.")
