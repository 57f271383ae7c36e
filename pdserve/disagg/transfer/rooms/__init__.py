"""One room on one side: its forward-only state (state.py), a prefill room's sender and its
destinations (sender.py), what a prefill remembers of rooms with no live sender (memory.py), and
a room made of several parts that must all succeed (all_of.py).
"""
