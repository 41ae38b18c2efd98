"""The requests the served benchmarks send: short coding tasks, as chat messages."""

TASKS = [
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that reverses the words in a sentence.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that computes the factorial of n.",
    "Write a Python function that removes duplicates from a list, keeping order.",
]
