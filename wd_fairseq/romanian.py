"""Romanian text normalisation of the standard WMT16 En-Ro setups (both sides of the
training data and of the evaluation).

Romanian s/t with comma below (ș ț, the correct letters) are often typed with a cedilla
(ş ţ); the two spellings must not count as different words. Removing diacritics
(ă â î ș ț -> a a i s t) is the other common convention, reported as its own BLEU.
Standard library only: the recipes' text tools load this file directly.
"""

_COMMA_BELOW = str.maketrans({"ş": "ș", "Ş": "Ș", "ţ": "ț", "Ţ": "Ț"})
_NO_DIACRITICS = str.maketrans({"ă": "a", "Ă": "A", "â": "a", "Â": "A", "î": "i", "Î": "I",
                                "ș": "s", "Ș": "S", "ț": "t", "Ț": "T"})


def normalize_romanian(text: str, remove_diacritics: bool = False) -> str:
    """ş ţ (cedilla) -> ș ț (comma below); with ``remove_diacritics`` also ă â î ș ț -> a a i s t."""
    text = text.translate(_COMMA_BELOW)
    return text.translate(_NO_DIACRITICS) if remove_diacritics else text
