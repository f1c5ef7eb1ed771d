"""tools/mutation's selection of the lines a change touched (``--changed-since``)."""

from tools.mutation import added_lines

DIFF = """diff --git a/efficient_attn/a.py b/efficient_attn/a.py
--- a/efficient_attn/a.py
+++ b/efficient_attn/a.py
@@ -3 +3 @@ def f():
-    return 1
+    return 2
@@ -10,0 +11,3 @@ def g():
+    x = 1
+    y = 2
+    z = 3
@@ -20,2 +23,0 @@ def h():
-    gone = 1
-    gone = 2
diff --git a/efficient_attn/old.py b/efficient_attn/old.py
--- a/efficient_attn/old.py
+++ /dev/null
@@ -1,2 +0,0 @@
-x = 1
-y = 2
"""


def test_the_new_sides_changed_lines_per_file():
    assert added_lines(DIFF) == {"efficient_attn/a.py": {3, 11, 12, 13}}  # a pure deletion adds no line
    assert added_lines("") == {}
