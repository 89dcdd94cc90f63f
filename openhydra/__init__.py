"""OpenHydra: peer-to-peer LLM inference. Each node serves a contiguous span of a model's layers."""

__version__ = "0.1.0"


def answer_version(prog: str, argv: list[str]) -> bool:
    """Print ``prog``'s OpenHydra version and say True when ``argv`` asks for it (every command answers
    ``--version`` so, before anything heavy is imported; Hydra's apps would print Hydra's version)."""
    if "--version" not in argv:
        return False
    print(f"{prog} {__version__}")
    return True
