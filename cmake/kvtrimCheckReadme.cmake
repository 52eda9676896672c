# cmake -DREADME=... -DEXAMPLE=... -P kvtrimCheckReadme.cmake
# Fails unless README's first C++ code block equals the example's lines between
# "// README begin" and "// README end", so the README shows code that compiles.
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(REGEX MATCH "```cpp\n([^`]*)```" _ "${readme}")
set(readme_code "${CMAKE_MATCH_1}")
string(REGEX MATCH "// README begin\n(.*)// README end\n" _ "${example}")
set(example_code "${CMAKE_MATCH_1}")
if(readme_code STREQUAL "" OR NOT readme_code STREQUAL example_code)
  message(FATAL_ERROR "README.md's usage example differs from ${EXAMPLE} (between the README markers); "
                      "edit both together.")
endif()
message(STATUS "README.md's usage example matches ${EXAMPLE}")
