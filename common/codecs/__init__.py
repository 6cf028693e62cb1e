"""Update codecs. Only ``identity`` exists so far; see common/codecs/identity.py."""
