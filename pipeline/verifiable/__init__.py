"""Verifiable instructions: checkers (`checks`), the prompt set (`prompts`), and judge
functions over them (`judge`) for the `function` judge kind."""
