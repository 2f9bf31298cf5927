# The demo corpus and teacher, shipped inside the package as prune.demo_data (see pyproject.toml):
# configs name them as ${prune.data:demo_corpus} and ${prune.data:demo_teacher}.
